"""The rollback-status page (in the admin, staff only) and its JSON twin (staff only)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from featureflags import views

urlpatterns = [
    path(
        "admin/featureflags/status/",
        admin.site.admin_view(views.status_page),
        name="flags-rollback-status",
    ),
    path("api/health/rollback-status", views.rollback_status, name="api-rollback-status"),
]
