"""Admin: flags (every change audited through featureflags.services) with rollout, rollback,
ramp and on/off actions, their change history and rollbacks (read-only), and a link to the
rollback-status page (featureflags/views.py)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from waffle.admin import FlagAdmin as WaffleFlagAdmin

from featureflags import services
from featureflags.models import Flag, FlagChange, RollbackEvent
from featureflags.selectors import percent_text, state_of

MSG_NOTHING_CHANGED = "Nothing changed: {error}."
MSG_ROLLED_OUT = "Rolled out {name} to {percent} % of users."
MSG_ROLLED_BACK = "Rolled back {name}: off for everyone."
MSG_ADVANCED = "Advanced {name} to step {step} of {steps}: {percent} % of users."
MSG_ENABLED = "Enabled {name} for everyone."
MSG_DISABLED = "Disabled {name} for everyone."
MSG_SAY_WHY = "Say why you change this flag."
MSG_DELETED = "Deleted flag {name}."


class FlagForm(forms.ModelForm):
    """A flag's settings as the change form edits them; the admin saves them through
    ``services.flag_create`` / ``services.flag_update`` (see ``FlagAdmin.save_model``)."""

    reason = forms.CharField(
        required=False,
        widget=forms.TextInput(attrs={"size": 80}),
        help_text="Why this change (recorded in the flag's history; required in production).",
    )

    class Meta:
        model = Flag
        fields = ("name", *services.EDITABLE_FIELDS)

    def clean_reason(self) -> str:
        reason = self.cleaned_data.get("reason", "").strip()
        if not reason and services.reason_required():
            raise forms.ValidationError(MSG_SAY_WHY)
        return reason

    def clean_ramp(self) -> Any:
        ramp = self.cleaned_data.get("ramp")
        return {} if ramp is None else ramp  # an emptied box: no plan

    def clean(self) -> dict[str, Any]:
        """Check the ramp plan and step the way the service will, so a bad one shows here."""
        cleaned = super().clean()
        if "ramp" in self.fields and "ramp" in cleaned:
            try:
                services.ramp_check(cleaned["ramp"], None)
            except services.FlagError as exc:
                self.add_error("ramp", str(exc))
                return cleaned
            if "ramp_step" in self.fields and "ramp_step" in cleaned:
                try:
                    services.ramp_check(cleaned["ramp"], cleaned["ramp_step"])
                except services.FlagError as exc:
                    self.add_error("ramp_step", str(exc))
        return cleaned


class ReasonForm(forms.Form):
    reason = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 70}),
        help_text="Recorded in each flag's history with your name.",
    )

    def __init__(self, *args: Any, reason_required: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["reason"].required = reason_required


class RolloutForm(ReasonForm):
    percent = forms.DecimalField(
        label="Percent of users",
        min_value=Decimal(0),
        max_value=Decimal(100),
        max_digits=5,
        decimal_places=2,
        widget=forms.NumberInput(attrs={"step": "0.01", "min": "0", "max": "100"}),
        help_text="0-100 in steps of 0.01. Raising it only adds users; it ends a rollback.",
    )
    field_order = ["percent", "reason"]


Change = Callable[[Flag], str]


@admin.register(Flag)
class FlagAdmin(WaffleFlagAdmin):
    form = FlagForm
    actions = [
        "set_rollout",
        "roll_back",
        "advance_ramp",
        "enable_for_everyone",
        "disable_for_everyone",
    ]
    # "State" sums up everyone, percent and rolled_back (waffle's own "rollout" is another field).
    list_display = ("name", "note", "state_label", "percent", "ramp_progress", "modified")
    list_filter = ("everyone", "rolled_back")
    # Waffle's "rollout" (a cookie mode of its random percentages) means nothing with
    # termsys's bucketing, so the form leaves it out; what it shows, it saves (audited).
    fieldsets = (
        (None, {"fields": ("name", "note")}),
        (
            "Who the flag is on for",
            {
                "fields": (
                    "everyone",
                    "percent",
                    "users",
                    "groups",
                    "superusers",
                    "staff",
                    "authenticated",
                    "testing",
                    "languages",
                )
            },
        ),
        ("Ramp", {"fields": ("ramp", "ramp_step", "ramp_step_at")}),
        ("Rollback", {"fields": ("rolled_back", "rolled_back_at")}),
        ("Record", {"fields": ("salt", "created", "modified")}),
        (None, {"fields": ("reason",)}),
    )
    readonly_fields = (
        "salt",
        "rolled_back",
        "rolled_back_at",
        "ramp_step_at",
        "created",
        "modified",
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Flag | None = None) -> Any:
        """A flag's name is fixed once it exists: code and history refer to it by name."""
        readonly = tuple(super().get_readonly_fields(request, obj))
        return ("name", *readonly) if obj is not None else readonly

    def has_delete_permission(self, request: HttpRequest, obj: Flag | None = None) -> bool:
        if obj is not None and obj.name in services.PRODUCT_FLAGS:
            return False  # the code asks for it; delete_view says so
        return super().has_delete_permission(request, obj)

    # --- the change form and delete page: every change through the audited services -------

    @staticmethod
    def _form_value(form: FlagForm, field: str) -> Any:
        value = form.cleaned_data[field]
        if field == "users":
            return [user.get_username() for user in value]
        if field == "groups":
            return [group.name for group in value]
        return value

    def save_model(self, request: HttpRequest, obj: Flag, form: FlagForm, change: bool) -> None:
        """Create or change the flag through the services (audited), never by ``obj.save()``;
        a refusal is shown as an error and nothing is saved."""
        who = {
            "actor": self._actor(request),
            "source": "admin",
            "reason": form.cleaned_data.get("reason", ""),
        }
        try:
            if change:
                changed = [f for f in form.changed_data if f in services.EDITABLE_FIELDS]
                if changed:
                    services.flag_update(
                        obj.name, **who, **{f: self._form_value(form, f) for f in changed}
                    )
            else:
                fields = [f for f in services.EDITABLE_FIELDS if f in form.cleaned_data]
                created = services.flag_create(
                    form.cleaned_data["name"],
                    **who,
                    **{f: self._form_value(form, f) for f in fields},
                )
                obj.pk = created.pk
        except services.FlagError as exc:
            request._flag_refused = True  # type: ignore[attr-defined]
            self.message_user(request, MSG_NOTHING_CHANGED.format(error=exc), messages.ERROR)

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        """Users and groups were saved by save_model's service call (audited with the rest);
        ``form.save_m2m()`` would set them again, unaudited."""
        if getattr(request, "_flag_refused", False):
            return
        for formset in formsets:
            self.save_formset(request, form, formset, change=change)

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        if not getattr(request, "_flag_refused", False):
            return super().log_addition(request, obj, message)
        return None

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        if not getattr(request, "_flag_refused", False):
            return super().log_change(request, obj, message)
        return None

    def response_add(self, request: HttpRequest, obj: Flag, post_url_continue: Any = None) -> Any:
        if getattr(request, "_flag_refused", False):
            return HttpResponseRedirect(request.get_full_path())
        return super().response_add(request, obj, post_url_continue)

    def response_change(self, request: HttpRequest, obj: Flag) -> Any:
        if getattr(request, "_flag_refused", False):
            return HttpResponseRedirect(request.get_full_path())
        return super().response_change(request, obj)

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: Any = None) -> Any:
        """Delete a flag through ``services.flag_delete`` (audited, with a reason); the
        product's flags are refused with a message."""
        flag = self.get_object(request, unquote(object_id))
        if flag is None or not self.has_view_or_change_permission(request, flag):
            return super().delete_view(request, object_id, extra_context)
        change_url = reverse("admin:featureflags_flag_change", args=[flag.pk])
        if flag.name in services.PRODUCT_FLAGS:
            message = services.MSG_PRODUCT_FLAG.format(name=flag.name)
            self.message_user(request, message, messages.ERROR)
            return HttpResponseRedirect(change_url)
        if request.method != "POST":
            context = {"reason_required": services.reason_required(), **(extra_context or {})}
            return super().delete_view(request, object_id, context)
        if not self.has_delete_permission(request, flag):
            raise PermissionDenied
        name = flag.name
        try:
            with transaction.atomic():
                self.log_deletions(request, Flag.objects.filter(pk=flag.pk))
                services.flag_delete(
                    name,
                    actor=self._actor(request),
                    source="admin",
                    reason=request.POST.get("reason", ""),
                )
        except services.FlagError as exc:
            self.message_user(request, MSG_NOTHING_CHANGED.format(error=exc), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        self.message_user(request, MSG_DELETED.format(name=name), messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:featureflags_flag_changelist"))

    @admin.display(description="State")
    def state_label(self, flag: Flag) -> str:
        return state_of(flag)[1]

    @admin.display(description="Ramp")
    def ramp_progress(self, flag: Flag) -> str:
        steps = flag.ramp.get("steps") if isinstance(flag.ramp, dict) else None
        if not isinstance(steps, list) or not steps:
            return "-"
        if flag.ramp_step is None:
            return f"not started ({len(steps)} steps)"
        return f"step {flag.ramp_step + 1} of {len(steps)}"

    # --- actions: each asks what it needs, then changes every selected flag or none ---------

    def _actor(self, request: HttpRequest) -> str:
        return request.user.get_username()

    def _ask(
        self,
        request: HttpRequest,
        queryset: QuerySet[Flag],
        *,
        action: str,
        title: str,
        form: forms.Form,
        intro: str,
        button: str,
        plans: dict[str, str] | None = None,
        danger: bool = False,
    ) -> TemplateResponse:
        """Render the intermediate page that asks for what ``action`` needs (a reason, a
        percentage) and posts the selection back to the changelist."""
        flags = list(queryset.order_by("name"))
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.opts,
            "form": form,
            "intro": intro,
            "button": button,
            "danger": danger,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "rows": [(f, state_of(f)[1], (plans or {}).get(f.name)) for f in flags],
            "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/featureflags/flag/action_form.html", context)

    def _apply(self, request: HttpRequest, queryset: QuerySet[Flag], change: Change) -> None:
        """Call ``change(flag)`` (a service call; returns what it did) for every selected flag in
        one transaction: if one is refused, none changes. Report the outcome as messages."""
        pks = list(queryset.values_list("pk", flat=True))
        done: list[str] = []
        try:
            with transaction.atomic():
                for flag in Flag.objects.select_for_update().filter(pk__in=pks).order_by("name"):
                    what = change(flag)
                    self.log_change(request, flag, what)
                    done.append(what)
        except services.FlagError as exc:
            self.message_user(request, MSG_NOTHING_CHANGED.format(error=exc), messages.ERROR)
            return
        for what in done:
            self.message_user(request, what, messages.SUCCESS)

    def _confirmed(self, request: HttpRequest) -> bool:
        return request.POST.get("apply") == "1"

    @admin.action(description="Set rollout %%…", permissions=["change"])
    def set_rollout(self, request: HttpRequest, queryset: QuerySet[Flag]) -> Any:
        required = services.reason_required()
        if self._confirmed(request):
            form = RolloutForm(request.POST, reason_required=required)
        else:
            current = queryset.first() if queryset.count() == 1 else None
            initial = {"percent": current.percent} if current and current.percent else {}
            form = RolloutForm(initial=initial, reason_required=required)
        if not form.is_bound or not form.is_valid():
            return self._ask(
                request,
                queryset,
                action="set_rollout",
                title="Set rollout percentage",
                form=form,
                intro="Turn these flags on for a share of users, picked by a stable hash of "
                "their id (everyone is unset; a rollback ends).",
                button="Set rollout",
            )
        percent, reason = form.cleaned_data["percent"], form.cleaned_data["reason"]

        def rollout(flag: Flag) -> str:
            services.flag_rollout(
                flag.name, percent, actor=self._actor(request), source="admin", reason=reason
            )
            return MSG_ROLLED_OUT.format(name=flag.name, percent=percent_text(percent))

        self._apply(request, queryset, rollout)
        return None

    @admin.action(description="Roll back…", permissions=["change"])
    def roll_back(self, request: HttpRequest, queryset: QuerySet[Flag]) -> Any:
        form = ReasonForm(request.POST if self._confirmed(request) else None, reason_required=True)
        if not form.is_bound or not form.is_valid():
            return self._ask(
                request,
                queryset,
                action="roll_back",
                title="Roll back",
                form=form,
                intro="Turn these flags off for everyone at once, overriding every other "
                "setting, until they are rolled out or enabled again. Live sessions on HYBRID "
                "storage flush their pending writes and move back to the stable mode.",
                button="Roll back",
                danger=True,
            )
        reason = form.cleaned_data["reason"]

        def rollback(flag: Flag) -> str:
            services.flag_rollback(
                flag.name, actor=self._actor(request), source="admin", reason=reason
            )
            return MSG_ROLLED_BACK.format(name=flag.name)

        self._apply(request, queryset, rollback)
        return None

    def _reason_then(
        self,
        request: HttpRequest,
        queryset: QuerySet[Flag],
        *,
        action: str,
        title: str,
        intro: str,
        change: Callable[[Flag, str], str],
        plans: dict[str, str] | None = None,
    ) -> Any:
        """Ask for a reason only when one is required, then apply ``change(flag, reason)``."""
        required = services.reason_required()
        form = ReasonForm(
            request.POST if self._confirmed(request) else None, reason_required=required
        )
        if required and (not form.is_bound or not form.is_valid()):
            return self._ask(
                request,
                queryset,
                action=action,
                title=title,
                form=form,
                intro=intro,
                button=title,
                plans=plans,
            )
        reason = form.cleaned_data["reason"] if form.is_bound and form.is_valid() else ""
        self._apply(request, queryset, lambda flag: change(flag, reason))
        return None

    @admin.action(description="Advance ramp", permissions=["change"])
    def advance_ramp(self, request: HttpRequest, queryset: QuerySet[Flag]) -> Any:
        plans = {}
        for flag in queryset.order_by("name"):
            try:
                step, percent = services.ramp_next_step(flag)
            except services.FlagError as exc:
                self.message_user(request, MSG_NOTHING_CHANGED.format(error=exc), messages.ERROR)
                return None
            plans[flag.name] = (
                f"step {step + 1} of {len(flag.ramp['steps'])}: {percent_text(percent)} %"
            )

        def advance(flag: Flag, reason: str) -> str:
            advanced = services.flag_ramp_advance(
                flag.name, actor=self._actor(request), source="admin", reason=reason
            )
            return MSG_ADVANCED.format(
                name=flag.name,
                step=advanced.ramp_step + 1,
                steps=len(advanced.ramp["steps"]),
                percent=percent_text(advanced.percent),
            )

        return self._reason_then(
            request,
            queryset,
            action="advance_ramp",
            title="Advance ramp",
            intro="Move these flags to the next step of their ramp plan.",
            change=advance,
            plans=plans,
        )

    @admin.action(description="Enable for everyone", permissions=["change"])
    def enable_for_everyone(self, request: HttpRequest, queryset: QuerySet[Flag]) -> Any:
        def enable(flag: Flag, reason: str) -> str:
            services.flag_enable(
                flag.name, actor=self._actor(request), source="admin", reason=reason
            )
            return MSG_ENABLED.format(name=flag.name)

        return self._reason_then(
            request,
            queryset,
            action="enable_for_everyone",
            title="Enable for everyone",
            intro="Turn these flags on for every user (this ends a rollback).",
            change=enable,
        )

    @admin.action(description="Disable for everyone", permissions=["change"])
    def disable_for_everyone(self, request: HttpRequest, queryset: QuerySet[Flag]) -> Any:
        def disable(flag: Flag, reason: str) -> str:
            services.flag_disable(
                flag.name, actor=self._actor(request), source="admin", reason=reason
            )
            return MSG_DISABLED.format(name=flag.name)

        return self._reason_then(
            request,
            queryset,
            action="disable_for_everyone",
            title="Disable for everyone",
            intro="Turn these flags off for every user, whatever their overrides say. This is "
            "not a rollback: no rollback event is recorded.",
            change=disable,
        )


# The admin index gets a link to the rollback-status page (unless a project-wide index is set).
if admin.site.index_template is None:
    admin.site.index_template = "admin/featureflags/index.html"


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(FlagChange)
class FlagChangeAdmin(ReadOnlyAdmin):
    list_display = ("at", "flag", "actor", "source", "reason")
    list_filter = ("flag", "source")
    search_fields = ("flag", "actor", "reason")


@admin.register(RollbackEvent)
class RollbackEventAdmin(ReadOnlyAdmin):
    list_display = ("at", "flag", "actor", "source", "automatic", "reason")
    list_filter = ("flag", "source", "automatic")
    search_fields = ("flag", "actor", "reason")
