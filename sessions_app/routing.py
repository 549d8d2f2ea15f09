from django.urls import re_path

from sessions_app.consumers import NoSuchTerminal, TerminalConsumer

websocket_urlpatterns = [
    re_path(r"^ws/terminals/(?P<session_id>[A-Za-z0-9_]{1,64})/$", TerminalConsumer.as_asgi()),
    # Any other path: a clear 4404, not the router's "No route found" (a 500 and a traceback).
    re_path(r"", NoSuchTerminal.as_asgi()),
]
