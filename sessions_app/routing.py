from django.urls import re_path

from sessions_app.consumers import TerminalConsumer

websocket_urlpatterns = [
    re_path(r"^ws/terminals/(?P<session_id>[A-Za-z0-9_]{1,64})/$", TerminalConsumer.as_asgi()),
]
