"""``manage.py flag_tasks``: the safeguard's checks and the ramp schedule, in a loop.

Server processes run the same work themselves (see featureflags/tasks.py); this command is for
deployments that want it in a worker of its own, or for running it once (``--once``).
"""

from __future__ import annotations

import time

from django.conf import settings
from django.core.management.base import BaseCommand

from featureflags import safeguard, tasks


class Command(BaseCommand):
    help = "Run the flag safeguard's checks and advance ramps, every TERMSYS_SAFEGUARD_INTERVAL."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--once", action="store_true", help="Check once and exit.")

    def handle(self, *args, once: bool = False, **options) -> None:
        while True:
            rolled_back = safeguard.check()
            advanced = tasks.ramp_tick()
            for name in rolled_back:
                self.stdout.write(f"rolled back {name} (safeguard)")
            for name in advanced:
                self.stdout.write(f"advanced the ramp of {name}")
            if once:
                return
            time.sleep(settings.TERMSYS_SAFEGUARD_INTERVAL)
