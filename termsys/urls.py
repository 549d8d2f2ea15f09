from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from sessions_app import api, metrics, views

# Errors Django raises before a view runs (a body too large, a Host not allowed, ...): JSON under
# /api/, Django's own pages elsewhere.
handler400 = "sessions_app.middleware.bad_request"
handler403 = "sessions_app.middleware.permission_denied"
handler404 = "sessions_app.middleware.page_not_found"
handler500 = "sessions_app.middleware.server_error"

urlpatterns = [
    path("", views.workspace, name="workspace"),
    # Pages without an icon of their own (the admin's) make browsers ask for /favicon.ico.
    path("favicon.ico", views.favicon),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path(
        "accounts/password/",
        auth_views.PasswordChangeView.as_view(template_name="accounts/password_change.html"),
        name="password_change",
    ),
    path(
        "accounts/password/done/",
        auth_views.PasswordChangeDoneView.as_view(template_name="accounts/password_changed.html"),
        name="password_change_done",
    ),
    path("watch/<str:session_id>/", views.watch, name="watch"),
    path("", include("featureflags.urls")),  # rollback status: admin page + JSON, before admin/
    path("admin/", admin.site.urls),
    path("api/health", api.health, name="api-health"),
    path("metrics", metrics.metrics, name="metrics"),
    path("api/projects", api.projects, name="api-projects"),
    path("api/terminal/list", api.terminal_list, name="api-terminal-list"),
    path("api/terminal/create", api.terminal_create, name="api-terminal-create"),
    path("api/terminal/<str:session_id>/close", api.terminal_close, name="api-terminal-close"),
    path("api/terminal/<str:session_id>/rename", api.terminal_rename, name="api-terminal-rename"),
    path("api/terminal/<str:session_id>/revive", api.terminal_revive, name="api-terminal-revive"),
    path("api/terminal/<str:session_id>/export", api.terminal_export, name="api-terminal-export"),
    path(
        "api/workspace/projects/<int:project_id>/terminals",
        api.project_terminals,
        name="api-project-terminals",
    ),
    path(
        "api/workspace/projects/<int:project_id>/snapshot",
        api.project_snapshot,
        name="api-project-snapshot",
    ),
    path("api/sessions/search", api.sessions_search, name="api-sessions-search"),
    re_path(r"^api/", api.not_found),
]
