"""``manage.py backup``: create, list, verify, restore (all or nothing), prune, SQLite → PG."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from waffle.models import Switch

from featureflags import services as flag_services
from featureflags.models import Flag
from sessions_app.backup import (
    archive,
    copies,
    derived,
    leftovers,
    migrations,
    portable,
    services,
    swap,
)
from sessions_app.management.commands import backup as command
from sessions_app.models import (
    OutputChunk,
    Project,
    SearchDocument,
    SessionEvent,
    TerminalSession,
)
from sessions_app.storage import get_storage
from tests.factories import ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
# Every byte value, and more than one chunk's worth of a session's output.
OUTPUT = bytes(range(256)) * 4 + b"\x1b[31mred\x1b[0m \xff\xfe invalid utf-8 \r\n"


@pytest.fixture(autouse=True)
def backup_dir(settings, tmp_path) -> Path:
    settings.TERMSYS_BACKUP_DIR = tmp_path / "backups"
    settings.TERMSYS_FLAG_REASON_REQUIRED = False
    flag_services.ensure_product_flags()  # the flush between tests removes the migration's
    return settings.TERMSYS_BACKUP_DIR


def backup(*args: str) -> str:
    """Run ``manage.py backup ARGS``; return what it printed."""
    out = io.StringIO()
    call_command("backup", *args, stdout=out, stderr=io.StringIO(), no_color=True)
    return out.getvalue()


def refused(*args: str) -> str:
    """Run ``manage.py backup ARGS``, expecting a refusal with exit code 1; return its message."""
    with pytest.raises(CommandError) as caught:
        backup(*args)
    assert caught.value.returncode == 1
    return str(caught.value)


def seed() -> dict[str, Any]:
    """Users, a group with a permission, projects, sessions with output and events, flags."""
    ana, bo = UserFactory(username="ana"), UserFactory(username="bo")
    group = Group.objects.create(name="ops")
    group.permissions.add(
        Permission.objects.get(content_type__app_label="featureflags", codename="change_flag")
    )
    ana.groups.add(group)
    bo.user_permissions.add(
        Permission.objects.get(content_type__app_label="sessions_app", codename="view_project")
    )
    project = ProjectFactory(owner=ana, name="api", path="/srv/api")
    ProjectFactory(owner=bo, name="web", path="/srv/web")
    sessions = []
    for n in range(3):
        session = TerminalSession.objects.create(
            project=project, user=ana, tab_name=f"tab {n}", state="exited", exit_code=n
        )
        SessionEvent.objects.create(session=session, kind="created", data={"n": n, "é": [1, 2]})
        for seq in range(2):
            data = OUTPUT + bytes([n, seq])
            OutputChunk.objects.create(
                session=session, seq=seq, offset=seq * len(data), data=data, text="red"
            )
        sessions.append(session)
    flag_services.flag_rollout(
        "dynamic_titles", "12.5", actor="command:ana", source="command", reason="canary"
    )
    flag_services.flag_rollback(
        "storage_hybrid", actor="command:ana", source="command", reason="p95 up"
    )
    Flag.objects.get(name="session_search").users.add(bo)
    Switch.objects.create(name="maintenance", active=True)
    return {"ana": ana, "sessions": sessions}


def snapshot() -> dict[str, list[tuple]]:
    """Every row of every backed-up model, by primary key; binary as bytes, permissions and
    content types by natural key (their ids are the database's own)."""
    rows = {}
    for model in portable.backup_models():
        names = [f.attname for f in portable.columns(model)]
        permission = {f.attname for f in portable.columns(model) if f.related_model is Permission}
        found = []
        for values in model._base_manager.order_by("pk").values_list(*names):
            row = []
            for name, value in zip(names, values, strict=True):
                if isinstance(value, memoryview):
                    row.append(bytes(value))
                elif name in permission:
                    perm = Permission.objects.select_related("content_type").get(pk=value)
                    row.append((perm.content_type.app_label, perm.codename))
                else:
                    row.append(value)
            found.append(tuple(row))
        rows[model._meta.label_lower] = found
    return rows


def search_documents() -> list[tuple]:
    """The search index's documents, without their ids (a rebuild numbers them afresh)."""
    fields = ("source", "source_id", "part", "session_id", "body")
    return sorted(SearchDocument.objects.values_list(*fields), key=repr)


def change_data(ana) -> None:
    """What happens after a backup: a session deleted, a project added, a flag changed."""
    TerminalSession.objects.filter(tab_name="tab 1").delete()
    ProjectFactory(owner=ana, name="new", path="/srv/new")
    flag_services.flag_enable("dynamic_titles", actor="command:ana", source="command")


def only_archive(directory: Path) -> Path:
    (found,) = directory.glob("termsys-backup-*.tar")
    return found


# --- create, restore -------------------------------------------------------------------------


def test_restore_brings_back_the_backup_row_for_row_and_byte_for_byte(backup_dir):
    seeded = seed()
    before = snapshot()
    documents = search_documents()
    assert ("output", "red") in {(d[0], d[4]) for d in documents}
    printed = backup("create", "--label", "before change")
    path = only_archive(backup_dir)
    assert f"Created {path}" in printed
    assert path.name.endswith("-before-change.tar")

    change_data(seeded["ana"])
    changed = snapshot()
    assert changed != before

    dry = backup("restore", str(path), "--dry-run")
    assert "sessions_app.terminalsession: 2 rows → 3" in dry
    assert "Dry run: nothing changed." in dry
    assert snapshot() == changed

    printed = backup("restore", str(path), "--yes")
    assert "row counts match the manifest" in printed
    assert snapshot() == before
    assert search_documents() == documents  # rebuilt once after the load, not by the triggers
    # (sorted: ids of sessions made in the same millisecond sort by their random part)
    assert sorted(bytes(c.data) for c in OutputChunk.objects.all()) == sorted(
        OUTPUT + bytes([n, seq]) for n in range(3) for seq in range(2)
    )
    # The data replaced is kept in a safety backup, which restores the changed state.
    safety = next(backup_dir.glob("*-safety.tar"))
    assert json.loads(tarfile.open(safety).extractfile("manifest.json").read())["label"] == (
        "safety"
    )
    backup("restore", str(safety), "--yes")
    assert snapshot() == changed


def search_index_state() -> list[tuple]:
    """What the engine's search index holds: on SQLite each FTS5 table over the documents,
    checked against them (``integrity-check`` raises on a mismatch) and asked for "red"; on
    PostgreSQL the documents' indexes (a restore builds them once, after the load)."""
    table = SearchDocument._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            found = []
            for fts in derived._sqlite_fts_over([table]):
                cursor.execute(f"INSERT INTO {fts}({fts}) VALUES ('integrity-check')")
                cursor.execute(f"SELECT count(*) FROM {fts} WHERE {fts} MATCH 'red'")
                found.append((fts, cursor.fetchone()[0]))
            return found
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", [table])
        return sorted(cursor.fetchall())


def test_the_search_index_is_whole_after_a_restore(backup_dir):
    seeded = seed()
    before = search_index_state()
    assert before
    backup("create")
    path = only_archive(backup_dir)
    change_data(seeded["ana"])
    backup("restore", str(path), "--yes")
    assert search_index_state() == before


def test_output_stored_after_a_restore_into_a_fresh_database_gets_its_own_document(backup_dir):
    """Moving to a new server: the restore brings the documents with their ids, and the next
    output stored must not be refused for taking one of them."""
    seed()
    backup("create")
    path = only_archive(backup_dir)
    if connection.vendor == "postgresql":  # counting from the archive's first id, as new
        first = SearchDocument.objects.order_by("id").values_list("id", flat=True)[0]
        with connection.cursor() as cursor:
            table = SearchDocument._meta.db_table
            cursor.execute(
                "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s, false)", [table, first]
            )
    backup("restore", str(path), "--yes")
    project, ana = Project.objects.get(name="api"), User.objects.get(username="ana")
    storage = get_storage("DATABASE")
    for n in range(3):
        session = TerminalSession.objects.create(project=project, user=ana, tab_name=f"new {n}")
        storage.append_output(session.id, 0, f"after-restore-{n}\r\n".encode())
    found = SearchDocument.objects.filter(source="output", body__contains="after-restore-")
    assert found.count() == 3


def test_create_can_leave_the_native_copy_out_and_the_safety_backup_undoes_a_restore(backup_dir):
    seed()
    printed = backup("create", "--no-native")
    path = only_archive(backup_dir)
    assert f"Created {path}" in printed
    with tarfile.open(path) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert not [name for name in names if name.startswith("native/")]
    assert manifest["native"]["member"] is None and "on request" in manifest["native"]["reason"]
    forms = "portable form, binary copies" if connection.vendor == "postgresql" else "portable form"
    assert f"rows as: {forms}; native copy: none" in backup("verify", str(path))
    TerminalSession.objects.all().delete()
    backup("restore", str(path), "--yes")
    assert TerminalSession.objects.count() == 3
    # The safety backup holds the data once: on SQLite the database file (a restore into the
    # same schema swaps it in or copies its pages), on PostgreSQL binary copies.
    safety = next(backup_dir.glob("*-safety.tar"))
    manifest = archive.read_manifest(safety)
    assert manifest["native"]["member"] == (
        "native/db.sqlite3" if connection.vendor == "sqlite" else None
    )
    assert not manifest["portable"]
    assert bool(manifest["copies"]) == (connection.vendor == "postgresql")
    verified = backup("verify", str(safety))
    printed = backup("restore", str(safety), "--yes")
    assert TerminalSession.objects.count() == 0
    if connection.vendor == "sqlite":
        assert "rows as: the native copy only; native copy: sqlite-file" in verified
        # As the database file where no other thread has it open (``swap_scenarios``), else
        # page for page: the test servers of earlier tests keep theirs open.
        assert "rows from the SQLite copy, " in printed
    else:
        assert "rows as: binary copies; native copy: none" in verified
        assert "rows from binary copies, search index loaded as stored" in printed


def all_search_documents() -> list[tuple]:
    """Every document as the database has it: id, every column, the vector as text."""
    table = SearchDocument._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT *, vector::text FROM {table} ORDER BY id")
        return cursor.fetchall()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's binary copies")
def test_undoing_a_restore_brings_back_the_search_documents_as_they_were(backup_dir):
    """The safety backup holds the documents as they are: restoring it (undoing the restore)
    loads them, not computing every vector again, and search finds what it found before."""
    seeded = seed()
    backup("create")
    path = only_archive(backup_dir)
    change_data(seeded["ana"])
    session = TerminalSession.objects.create(
        project=Project.objects.get(name="new"), user=seeded["ana"], tab_name="after"
    )
    get_storage("DATABASE").append_output(session.id, 0, b"only-after-the-backup\r\n")
    changed, documents = snapshot(), all_search_documents()
    assert "only-after-the-backup" in str(documents)

    printed = backup("restore", str(path), "--yes")
    assert "rows from binary copies, search index loaded as stored" in printed
    assert not SearchDocument.objects.filter(body__contains="only-after-the-backup").exists()

    safety = next(backup_dir.glob("*-safety.tar"))
    with tarfile.open(safety) as tar:
        names = tar.getnames()
    # zstd, written about three times as fast as gzip while the restore waits for it.
    assert "derived/sessions_app.searchdocument.pgcopy.zst" in names
    copied = [name for name in names if name.startswith("copy/")]
    assert copied and all(name.endswith(".pgcopy.zst") for name in copied)
    assert not [name for name in names if name.startswith("data/")]  # no portable form
    printed = backup("restore", str(safety), "--yes")
    assert "rows from binary copies, search index loaded as stored" in printed
    assert snapshot() == changed
    assert all_search_documents() == documents  # ids, bodies and vectors
    out = io.StringIO()
    call_command("sessions", "search", '"only after the backup"', "--user", "ana", stdout=out)
    assert session.id in out.getvalue() and "[only" in out.getvalue()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's binary copies")
def test_an_archive_loads_its_binary_copies_here_and_its_portable_form_where_they_do_not_fit(
    backup_dir,
):
    """An archive made on PostgreSQL holds binary copies of its rows beside the portable form:
    a restore into the database it was made from loads the copies; where they would mean other
    rows (other content type ids), the portable form, to the same data."""
    seeded = seed()
    backup("create")
    path = only_archive(backup_dir)
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert [name for name in names if name.startswith("copy/")]
    assert [name for name in names if name.startswith("data/")]
    assert "rows as: portable form, binary copies; native copy: pg_dump-custom" in backup(
        "verify", str(path)
    )
    expected, documents = snapshot(), all_search_documents()
    change_data(seeded["ana"])
    printed = backup("restore", str(path), "--yes")
    assert "rows from binary copies, search index loaded as stored" in printed
    assert snapshot() == expected
    assert all_search_documents() == documents

    change_data(seeded["ana"])
    ContentType.objects.create(app_label="elsewhere", model="thing")  # another database's ids
    printed = backup("restore", str(path), "--yes")
    assert "rows from the portable form, search index loaded as stored" in printed
    assert snapshot() == expected
    assert all_search_documents() == documents


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's binary copies")
def test_a_safety_backup_of_format_version_3_with_gzip_copies_still_restores(
    backup_dir, tmp_path, monkeypatch
):
    """Safety backups written before version 4 hold gzip copies; restore still reads them."""
    seeded = seed()
    backup("create")
    monkeypatch.setattr(copies, "CODEC", "gzip")  # as version 3 wrote them
    backup("restore", str(only_archive(backup_dir)), "--yes")
    monkeypatch.undo()
    safety = next(backup_dir.glob("*-safety.tar"))
    rewrite(safety, lambda m: m.update(version=3), tmp=tmp_path)
    with tarfile.open(safety) as tar:
        names = tar.getnames()
        first = tar.extractfile(next(n for n in names if n.startswith("copy/"))).read(2)
    assert first == b"\x1f\x8b"  # gzip
    assert "derived/sessions_app.searchdocument.pgcopy.gz" in names
    before, documents = snapshot(), all_search_documents()
    change_data(seeded["ana"])
    printed = backup("restore", str(safety), "--yes")
    assert "rows from binary copies, search index loaded as stored" in printed
    assert snapshot() == before
    assert all_search_documents() == documents


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's binary copies")
def test_a_safety_backup_is_refused_where_its_ids_mean_other_rows(backup_dir):
    """Binary copies keep content type and permission ids as they are: in a database where
    those ids name other things, the safety backup is refused, and nothing changes."""
    seeded = seed()
    backup("create")
    backup("restore", str(only_archive(backup_dir)), "--yes")
    safety = next(backup_dir.glob("*-safety.tar"))
    change_data(seeded["ana"])
    ContentType.objects.create(app_label="elsewhere", model="thing")  # another database's ids
    before = snapshot()
    message = refused("restore", str(safety), "--dry-run")  # says so before anyone confirms
    assert "its content type and permission ids are not this database's" in message
    message = refused("restore", str(safety), "--yes")
    assert "holds its rows only as PostgreSQL binary COPY (a safety backup)" in message
    assert "its content type and permission ids are not this database's" in message
    assert "nothing changed" in message
    assert snapshot() == before
    assert len(list(backup_dir.glob("*-safety*.tar"))) == 1  # refused before its own safety


def documents_table() -> dict[str, list[tuple]]:
    """The search documents table as migrations and grants made it, by name: columns, keys,
    indexes, triggers, identity sequence, grants (what a later migration finds)."""
    queries = {
        "columns": "SELECT attname, format_type(atttypid, atttypmod), attnotnull, attidentity, "
        "attstorage, pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d "
        "ON d.adrelid = a.attrelid AND d.adnum = a.attnum WHERE attrelid = %(t)s::regclass "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        "constraints": "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
        "WHERE conrelid = %(t)s::regclass ORDER BY conname",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %(t)s "
        "ORDER BY indexname",
        "triggers": "SELECT tgname, pg_get_triggerdef(oid), tgenabled FROM pg_trigger "
        "WHERE tgrelid = %(t)s::regclass AND NOT tgisinternal ORDER BY tgname",
        "statistics": "SELECT pg_get_statisticsobjdef(oid) FROM pg_statistic_ext "
        "WHERE stxrelid = %(t)s::regclass ORDER BY stxname",
        "sequence": "SELECT pg_get_serial_sequence(%(t)s, 'id')",
        "grants": "SELECT grantee, privilege_type FROM information_schema.role_table_grants "
        "WHERE table_name = %(t)s ORDER BY 1, 2",
    }
    found = {}
    with connection.cursor() as cursor:
        for name, sql in queries.items():
            cursor.execute(sql, {"t": SearchDocument._meta.db_table})
            found[name] = cursor.fetchall()
    return found


def documents_table_oid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::regclass::oid", [SearchDocument._meta.db_table])
        return cursor.fetchone()[0]


def swap_table_left() -> bool:
    """Whether a restore left its table of documents loaded beside (PostgreSQL) behind."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [swap.SIDE])
        return cursor.fetchone()[0]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's stored documents")
def test_a_restore_swaps_in_the_search_documents_with_every_name_and_grant(backup_dir):
    """The stored documents load beside the rows, into a table of their own swapped in at the
    end: the table keeps every name migrations gave it, and its grants, and search and new
    output work as before."""
    seeded = seed()
    table = SearchDocument._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"GRANT SELECT ON {table} TO PUBLIC")  # a reporting role, say
    shape, oid, documents = documents_table(), documents_table_oid(), all_search_documents()
    assert ("PUBLIC", "SELECT") in shape["grants"] and shape["sequence"] != [(None,)]
    assert shape["statistics"]  # the GIN index halves' (migration 0009_search_vector_halves)
    backup("create")
    change_data(seeded["ana"])

    printed = backup("restore", str(only_archive(backup_dir)), "--yes")
    assert "search index loaded as stored" in printed
    assert documents_table_oid() != oid  # another table...
    assert documents_table() == shape  # ...with every name, definition and grant of the first
    assert all_search_documents() == documents
    assert not swap_table_left()
    # Its triggers and identity: new output gets a document of its own, found by search.
    session = TerminalSession.objects.create(
        project=Project.objects.get(name="api"), user=seeded["ana"], tab_name="after"
    )
    get_storage("DATABASE").append_output(session.id, 0, b"written-after-the-swap\r\n")
    found = SearchDocument.objects.get(source="output", body__contains="written-after-the-swap")
    assert found.id > max(row[0] for row in documents)
    out = io.StringIO()
    call_command("sessions", "search", "written-after-the-swap", "--user", "ana", stdout=out)
    assert session.id in out.getvalue()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's stored documents")
def test_a_documents_table_that_a_view_reads_is_loaded_in_place(backup_dir):
    """Where swapping the table would lose something (a view over it), the documents load in
    the restore's own transaction: the view still answers, with the restored documents."""
    seeded = seed()
    table = SearchDocument._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE VIEW termsys_test_documents AS SELECT session_id FROM {table}")
    try:
        oid, documents = documents_table_oid(), all_search_documents()
        backup("create")
        change_data(seeded["ana"])
        printed = backup("restore", str(only_archive(backup_dir)), "--yes")
        assert "search index loaded as stored" in printed
        assert documents_table_oid() == oid
        assert all_search_documents() == documents
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM termsys_test_documents")
            assert cursor.fetchone()[0] == len(documents)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP VIEW IF EXISTS termsys_test_documents")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's stored documents")
def test_stored_documents_that_name_a_missing_session_roll_the_restore_back(backup_dir):
    """The documents loaded beside are checked when swapped in: an archive whose documents name
    a session it does not hold is rolled back after they loaded, and their table dropped."""
    seeded = seed()
    table = SearchDocument._meta.db_table
    with connection.cursor() as cursor:  # a document of no session, as a bad archive would hold
        cursor.execute("SET session_replication_role = replica")
        cursor.execute(
            f"INSERT INTO {table} (source, source_id, part, at, body, session_id, user_id, "
            "project_id, status, profile) SELECT source, source_id + 1000, part, at, body, "
            f"'session_0000000000000_gone', user_id, project_id, status, profile FROM {table} "
            "LIMIT 1"
        )
        cursor.execute("SET session_replication_role = origin")
    try:
        backup("create")
        change_data(seeded["ana"])
        changed, documents = snapshot(), all_search_documents()
        shape, oid = documents_table(), documents_table_oid()
        message = refused("restore", str(only_archive(backup_dir)), "--yes")
        assert "session_id" in message and "rolled back and nothing changed" in message
        assert snapshot() == changed
        assert all_search_documents() == documents
        assert (documents_table(), documents_table_oid()) == (shape, oid)
        assert not swap_table_left()
    finally:
        SearchDocument.objects.filter(session_id="session_0000000000000_gone").delete()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's stored documents")
def test_stored_documents_that_break_a_unique_key_roll_the_restore_back(backup_dir):
    """The unique keys of the documents loaded beside are built from indexes another connection
    builds: documents that break one fail the restore, named, and nothing changes."""
    seeded = seed()
    table = SearchDocument._meta.db_table
    with connection.cursor() as cursor:  # twice the same (source, source_id, part)
        cursor.execute(f"ALTER TABLE {table} DROP CONSTRAINT searchdoc_unique_source")
        cursor.execute("SET session_replication_role = replica")
        cursor.execute(
            f"INSERT INTO {table} (source, source_id, part, at, body, vector, session_id, "
            "user_id, project_id, status, profile) SELECT source, source_id, part, at, body, "
            f"vector, session_id, user_id, project_id, status, profile FROM {table} "
            "WHERE source = 'output' ORDER BY id LIMIT 1 RETURNING id"
        )
        (twin,) = cursor.fetchone()
        cursor.execute("SET session_replication_role = origin")
    try:
        backup("create")
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {table} WHERE id = %s", [twin])
            cursor.execute(
                f"ALTER TABLE {table} ADD CONSTRAINT searchdoc_unique_source "
                "UNIQUE (source, source_id, part)"
            )
    change_data(seeded["ana"])
    changed, documents = snapshot(), all_search_documents()
    shape, oid = documents_table(), documents_table_oid()
    message = refused("restore", str(only_archive(backup_dir)), "--yes")
    assert (
        "(source, source_id, part)=(output, " in message and "is duplicated; the restore" in message
    )
    assert "searchdoc_unique_source" in message and "termsys_restore" not in message
    assert "rolled back and nothing changed" in message
    assert snapshot() == changed
    assert all_search_documents() == documents
    assert (documents_table(), documents_table_oid()) == (shape, oid)
    assert not swap_table_left()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's stored documents")
def test_a_restore_drops_the_table_a_killed_restore_left(backup_dir):
    seeded = seed()
    documents = all_search_documents()
    backup("create")
    change_data(seeded["ana"])
    with connection.cursor() as cursor:  # as a restore killed mid-way leaves it
        cursor.execute(f"CREATE TABLE {swap.SIDE} (id bigint)")
    backup("restore", str(only_archive(backup_dir)), "--yes")
    assert all_search_documents() == documents
    assert not swap_table_left()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's pg_dump copy")
@pytest.mark.skipif(not shutil.which("pg_restore"), reason="needs pg_restore")
def test_pg_dumps_copy_leaves_out_the_table_a_killed_restore_left(backup_dir, tmp_path):
    seed()
    with connection.cursor() as cursor:  # as a restore killed mid-way leaves it
        cursor.execute(f"CREATE TABLE {swap.SIDE} (id bigint)")
    try:
        backup("create")
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE {swap.SIDE}")
    with tarfile.open(only_archive(backup_dir)) as archive:
        archive.extract("native/db.pgdump", tmp_path, filter="data")
    listing = subprocess.run(
        ["pg_restore", "--list", str(tmp_path / "native" / "db.pgdump")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert TerminalSession._meta.db_table in listing  # termsys's own tables are there
    assert swap.SIDE not in listing


def test_restore_continues_ids_after_the_restored_ones(backup_dir):
    seed()
    backup("create")
    path = only_archive(backup_dir)
    Project.objects.all().delete()
    backup("restore", str(path), "--yes")
    highest = Project.objects.order_by("-pk").first().pk
    ana = TerminalSession.objects.first().user
    assert ProjectFactory(owner=ana, name="after").pk > highest


def test_the_archive_is_private_and_describes_itself(backup_dir):
    seed()
    backup("create")
    path = only_archive(backup_dir)
    assert path.stat().st_mode & 0o777 == 0o600
    assert backup_dir.stat().st_mode & 0o077 == 0
    assert [p.name for p in backup_dir.iterdir()] == [path.name]  # no temporary files left
    with tarfile.open(path) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())
        chunk_member = next(m for m in manifest["models"] if m["model"].endswith("outputchunk"))
        lines = gzip.decompress(tar.extractfile(chunk_member["member"]).read()).splitlines()
    assert names[0] == "manifest.json" and names[-1] == "manifest.sha256"
    assert manifest["format"] == "termsys-backup" and manifest["version"] == 4
    assert manifest["database"]["vendor"] == connection.vendor
    assert manifest["migrations"] == migrations.applied()
    counts = {m["model"]: m["rows"] for m in manifest["models"]}
    assert counts["sessions_app.terminalsession"] == 3
    assert counts["sessions_app.outputchunk"] == 6
    assert counts["auth.group_permissions"] == 1
    assert "sessions.session" in manifest["skipped"]
    assert manifest["native"]["member"] in names
    assert set(manifest["members"]) == set(names) - {"manifest.json", "manifest.sha256"}
    assert all(len(m["sha256"]) == 64 for m in manifest["members"].values())
    assert len(lines) == 6
    assert json.loads(lines[0])["data"]  # base64 of the bytes
    verified = backup("verify", str(path))
    assert "OK" in verified and f"{len(names) - 2} members match their sha256" in verified


def test_progress_is_plain_lines_when_not_a_terminal():
    seed()
    printed = backup("create")
    assert "\r" not in printed
    assert "export: 0/" in printed and "(100%)" in printed


def test_the_progress_bar_redraws_in_place_on_a_terminal():
    out = io.StringIO()
    progress = command.Progress(command.OutputWrapper(out), tty=True)
    progress.stage("export", 200)
    progress.advance(100)
    progress.advance(100)
    progress.finish()
    assert "\rexport   [###############...............]  50%" in out.getvalue()
    assert out.getvalue().endswith("100%\n")


# --- refusals ---------------------------------------------------------------------------------


def flip_byte_in(path: Path, member: str, at: int = 10) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data + at
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def corrupt(path: Path, kind: str) -> str:
    """Damage the archive at ``path``; return the words the refusal must contain."""
    if kind == "flipped byte in the output":
        member = next(
            n for n in tarfile.open(path).getnames() if n.endswith("outputchunk.jsonl.gz")
        )
        flip_byte_in(path, member)
        return "fails its sha256 check"
    if kind == "flipped byte in the manifest":
        flip_byte_in(path, "manifest.json", at=40)
        return "manifest.json does not match manifest.sha256"
    if kind == "flipped byte in the native copy":
        flip_byte_in(
            path,
            "native/db.sqlite3" if connection.vendor == "sqlite" else "native/db.pgdump",
            at=100,
        )
        return "fails its sha256 check"
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return "truncated"
    if kind == "not an archive":
        path.write_text("sessions:\n  - id: 1\n")
        return "not a termsys backup archive"
    if kind == "empty":
        path.write_bytes(b"")
        return "not a termsys backup archive"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "flipped byte in the output",
        "flipped byte in the manifest",
        "flipped byte in the native copy",
        "truncated",
        "not an archive",
        "empty",
    ],
)
def test_a_corrupt_archive_is_refused_and_the_data_is_untouched(backup_dir, kind):
    seeded = seed()
    backup("create")
    path = only_archive(backup_dir)
    change_data(seeded["ana"])
    changed = snapshot()
    words = corrupt(path, kind)

    message = refused("restore", str(path), "--yes")
    assert words in message and "nothing changed" in message
    assert str(path) in message
    assert words in refused("verify", str(path))
    assert snapshot() == changed
    assert not list(backup_dir.glob("*-safety.tar"))  # refused before anything was done


def test_the_command_exits_1_with_the_reason_on_stderr(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00" * 100)
    env = {**os.environ, "TERMSYS_VAR_DIR": str(tmp_path / "var")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "backup", "verify", str(junk)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"{junk}: not a termsys backup archive" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_file_is_refused():
    assert "no such file" in refused("restore", "/nonexistent/backup.tar", "--yes")


def rewrite(
    path: Path, edit_manifest=None, edit_rows=None, tmp: Path | None = None, keep=None
) -> None:
    """Rebuild the archive at ``path`` with an edited manifest and rows (checksums redone),
    and only the members ``keep`` says yes to."""
    work = Path(tmp or path.parent) / "rewrite"
    work.mkdir(parents=True)
    with tarfile.open(path) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        if edit_rows is not None and manifest.get("copies"):
            # The binary copies hold the rows as they were: without them the edited rows load.
            manifest["copies"] = None
            for entry in manifest["models"]:
                entry["copy"] = None
        files = {}
        for name in manifest["members"]:
            if keep is not None and not keep(name):
                continue
            if name.startswith("copy/") and not manifest.get("copies"):
                continue
            local = work / name.replace("/", "_")
            local.write_bytes(tar.extractfile(name).read())
            files[name] = local
    for entry in manifest["models"]:
        if edit_rows is not None:
            local = files[entry["member"]]
            rows = [json.loads(line) for line in gzip.decompress(local.read_bytes()).splitlines()]
            rows, entry["fields"] = edit_rows(entry["model"], rows, entry["fields"])
            entry["rows"] = len(rows)
            local.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows)))
    if edit_manifest is not None:
        edit_manifest(manifest)
    del manifest["members"]
    path.unlink()
    archive.write(path, manifest, files)


def test_an_archive_from_newer_code_is_refused(backup_dir, tmp_path):
    seed()
    backup("create")
    path = only_archive(backup_dir)
    rewrite(
        path,
        lambda m: m["migrations"]["sessions_app"].append("0099_from_the_future"),
        tmp=tmp_path,
    )
    before = snapshot()
    message = refused("restore", str(path), "--yes")
    assert "made by newer code" in message
    assert "sessions_app.0099_from_the_future" in message and "Nothing changed" in message
    assert snapshot() == before


def test_an_archive_from_an_older_schema_is_loaded_with_defaults(backup_dir, tmp_path):
    seed()
    TerminalSession.objects.update(end_reason="exited")
    backup("create")
    path = only_archive(backup_dir)

    def before_end_reason(model, rows, fields):
        if model != "sessions_app.terminalsession":
            return rows, fields
        for row in rows:
            del row["end_reason"]
        return rows, [f for f in fields if f != "end_reason"]

    def drop_migration(manifest):
        manifest["migrations"]["sessions_app"] = [
            name for name in manifest["migrations"]["sessions_app"] if name < "0003"
        ]

    rewrite(path, drop_migration, before_end_reason, tmp=tmp_path)
    TerminalSession.objects.all().delete()
    printed = backup("restore", str(path), "--yes")
    assert "older schema" in printed and "sessions_app.0003_end_reason" in printed
    assert "defaulted: end_reason" in printed
    assert TerminalSession.objects.count() == 3
    assert set(TerminalSession.objects.values_list("end_reason", flat=True)) == {""}
    assert OutputChunk.objects.count() == 6


@pytest.mark.parametrize("native", [True, False], ids=["with native copy", "portable only"])
def test_an_archive_of_format_version_1_still_restores(backup_dir, tmp_path, native):
    seeded = seed()
    before, documents = snapshot(), search_documents()
    backup("create")
    path = only_archive(backup_dir)

    def as_version_1(manifest):
        # What version 1 wrote: no "portable" nor "search_index", the native copy (for
        # operators then) made with SQLite's backup API or pg_dump.
        manifest["version"] = 1
        del manifest["portable"], manifest["search_index"]
        if manifest["native"]["member"] and manifest["database"]["vendor"] == "sqlite":
            manifest["native"]["kind"] = "sqlite-backup-api"

    def drop_members(manifest):
        as_version_1(manifest)
        if not native and manifest["native"]["member"]:
            manifest["native"] = {"member": None, "kind": None, "reason": "left out on request"}

    dropped = ("derived/",) if native else ("derived/", "native/")
    rewrite(path, drop_members, tmp=tmp_path, keep=lambda name: not name.startswith(dropped))
    assert archive.read_manifest(path)["version"] == 1
    change_data(seeded["ana"])
    backup("restore", str(path), "--yes")
    assert snapshot() == before
    assert search_documents() == documents


@pytest.mark.skipif(connection.vendor != "sqlite", reason="a safety backup of SQLite")
def test_a_safety_backup_of_an_older_schema_loads_row_by_row(backup_dir, tmp_path):
    seeded = seed()
    backup("create")
    change_data(seeded["ana"])
    changed, documents = snapshot(), search_documents()
    backup("restore", str(only_archive(backup_dir)), "--yes")
    safety = next(backup_dir.glob("*-safety.tar"))
    assert not archive.read_manifest(safety)["portable"]  # the database file only

    def older(manifest):  # as if made before 0003_end_reason: its pages cannot be copied over
        manifest["migrations"]["sessions_app"] = [
            name for name in manifest["migrations"]["sessions_app"] if name < "0003"
        ]

    rewrite(safety, older, tmp=tmp_path)
    printed = backup("restore", str(safety), "--yes")
    assert "older schema" in printed and "row counts match the manifest" in printed
    assert snapshot() == changed
    assert search_documents() == documents


def test_a_restore_whose_row_counts_differ_is_rolled_back(backup_dir, tmp_path):
    seeded = seed()
    backup("create")
    path = only_archive(backup_dir)
    # A manifest that promises a row its data member does not have (as if rows went missing).
    rewrite(
        path,
        lambda m: next(e for e in m["models"] if e["model"].endswith("outputchunk")).update(rows=7),
        tmp=tmp_path,
    )
    change_data(seeded["ana"])
    changed, documents = snapshot(), search_documents()
    message = refused("restore", str(path), "--yes")
    assert "sessions_app.outputchunk has 6 rows, the archive says 7" in message
    assert "rolled back" in message
    assert snapshot() == changed
    assert search_documents() == documents
    assert not swap_table_left()


def test_a_row_that_fails_to_load_rolls_the_restore_back(backup_dir, tmp_path):
    # On PostgreSQL with stored documents the rows are formatted in a thread while the index
    # builds (``ahead``); an error there fails the model's load all the same. (No native copy:
    # SQLite would copy its pages back instead of loading rows.)
    seeded = seed()
    backup("create", "--no-native")
    path = only_archive(backup_dir)

    def break_last_chunk(model: str, rows: list[dict], fields: list[str]) -> tuple:
        if model.endswith("outputchunk"):
            rows[-1]["data"] = "x"  # not base64
        return rows, fields

    rewrite(path, edit_rows=break_last_chunk, tmp=tmp_path)
    change_data(seeded["ana"])
    changed, documents = snapshot(), search_documents()
    message = refused("restore", str(path), "--yes")
    assert "loading sessions_app.outputchunk failed" in message
    assert "rolled back" in message
    assert snapshot() == changed
    assert search_documents() == documents
    assert not swap_table_left()


def test_a_failed_safety_backup_stops_the_restore_before_it_changes_anything(
    backup_dir, monkeypatch
):
    seeded = seed()
    backup("create")
    path = only_archive(backup_dir)
    change_data(seeded["ana"])
    changed = snapshot()
    real = services.backup_create

    def failing(**kwargs: Any) -> services.Created:
        if kwargs["label"] == services.SAFETY_LABEL:
            raise OSError("No space left on device")
        return real(**kwargs)

    monkeypatch.setattr(services, "backup_create", failing)
    message = refused("restore", str(path), "--yes")
    assert "the safety backup failed (No space left on device)" in message
    assert "nothing changed" in message
    assert snapshot() == changed


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's FTS5 settings")
def test_a_restore_leaves_the_fts5_settings_as_they_were(backup_dir):
    seed()
    (fts,) = derived._sqlite_fts_over([SearchDocument._meta.db_table])

    def settings() -> list[tuple]:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT k, v FROM {fts}_config WHERE k <> 'version' ORDER BY k")
            return [(k, v) for k, v in cursor.fetchall() if not (k == "hashsize" and v == 1 << 20)]

    before = settings()
    backup("create")
    backup("restore", str(only_archive(backup_dir)), "--yes")
    assert settings() == before


def test_restore_without_a_terminal_needs_yes(backup_dir, monkeypatch):
    seed()
    backup("create")
    path = only_archive(backup_dir)
    TerminalSession.objects.all().delete()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert refused("restore", str(path)) == command.NO_TTY
    assert TerminalSession.objects.count() == 0


def test_restore_asks_on_a_terminal(backup_dir, monkeypatch):
    seed()
    backup("create")
    path = only_archive(backup_dir)
    TerminalSession.objects.all().delete()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("no\n"))
    assert command.DECLINED in backup("restore", str(path))
    assert TerminalSession.objects.count() == 0
    monkeypatch.setattr(sys, "stdin", Terminal("yes\n"))
    backup("restore", str(path))
    assert TerminalSession.objects.count() == 3


# --- list, prune ------------------------------------------------------------------------------


def test_list_shows_archives_newest_first_and_prune_keeps_the_newest(backup_dir):
    assert "No backups" in backup("list")
    seed()
    for label in ("first", "second", "third"):
        backup("create", "--label", label)
    (backup_dir / "termsys-backup-junk.tar").write_text("not an archive")
    listed = backup("list").splitlines()
    readable = [line for line in listed if "unreadable" not in line]
    assert [line.split()[-1] for line in readable] == ["third", "second", "first"]
    assert "3 sessions" in readable[0] and connection.vendor in readable[0]
    assert any(line.startswith("termsys-backup-junk.tar  unreadable") for line in listed)

    with pytest.raises(CommandError, match="--keep must be 1 or more"):
        backup("prune", "--keep", "0")
    printed = backup("prune", "--keep", "1")
    assert "Pruned 2 archive(s)" in printed
    kept = {p.name for p in backup_dir.glob("termsys-backup-*.tar")}
    assert "termsys-backup-junk.tar" in kept  # unreadable: neither kept nor deleted by prune
    assert [name for name in kept if name.endswith(".tar") and "junk" not in name] == [
        next(name for name in kept if name.endswith("-third.tar"))
    ]


def test_create_writes_to_output_dir(tmp_path):
    seed()
    printed = backup("create", "--output", str(tmp_path / "elsewhere"))
    path = only_archive(tmp_path / "elsewhere")
    assert str(path) in printed


# --- SQLite → PostgreSQL ----------------------------------------------------------------------

SEED_SQLITE = """
from decimal import Decimal
from featureflags import services
from featureflags.models import Flag
from sessions_app.models import OutputChunk, SessionEvent, TerminalSession
from tests.factories import ProjectFactory, UserFactory
from tests.test_backup import OUTPUT
ana = UserFactory(username="ana")
project = ProjectFactory(owner=ana, name="api", path="/srv/api")
for n in range(4):
    s = TerminalSession.objects.create(project=project, user=ana, tab_name=f"tab {n}")
    SessionEvent.objects.create(session=s, kind="created", data={"n": n})
    OutputChunk.objects.create(session=s, seq=0, offset=0, data=OUTPUT + bytes([n]), text="x")
services.flag_rollout("dynamic_titles", "12.5", actor="t", source="command", reason="canary")
Flag.objects.get(name="session_search").users.add(ana)
"""


def test_an_archive_made_on_sqlite_restores_into_postgresql(tmp_path):
    if connection.vendor != "postgresql":
        pytest.skip("needs the PostgreSQL configuration (DATABASE_URL=postgres://...)")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(TERMSYS_VAR_DIR=str(tmp_path / "var"), TERMSYS_FLAG_TASKS="0")
    manage = [sys.executable, str(ROOT / "manage.py")]
    for argv in (
        ["migrate", "--noinput", "-v0"],
        ["shell", "-v0", "-c", SEED_SQLITE],
        ["backup", "create", "--output", str(tmp_path / "out"), "--label", "from sqlite"],
    ):
        done = subprocess.run(
            manage + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    path = only_archive(tmp_path / "out")
    with tarfile.open(path) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert manifest["database"]["vendor"] == "sqlite"
    assert "native/db.sqlite3" in manifest["members"]

    UserFactory(username="someone-else")
    printed = backup("restore", str(path), "--yes")
    assert "row counts match the manifest" in printed
    assert list(TerminalSession.objects.values_list("tab_name", flat=True)) == [
        f"tab {n}" for n in range(4)
    ]
    assert [bytes(c.data) for c in OutputChunk.objects.order_by("session__tab_name")] == [
        OUTPUT + bytes([n]) for n in range(4)
    ]
    assert list(SessionEvent.objects.order_by("pk").values_list("data", flat=True)) == [
        {"n": n} for n in range(4)
    ]
    assert SearchDocument.objects.filter(source="output").count() == 4  # rebuilt on PostgreSQL
    flag = Flag.objects.get(name="dynamic_titles")
    assert flag.percent == Decimal("12.50") and flag.everyone is None
    assert [u.username for u in Flag.objects.get(name="session_search").users.all()] == ["ana"]
    from django.contrib.auth import get_user_model

    assert list(get_user_model().objects.values_list("username", flat=True)) == ["ana"]
    # The sequences continue after the restored ids.
    assert UserFactory().pk > get_user_model().objects.get(username="ana").pk


# --- faults: full disks, unwritable directories, interrupts -----------------------------------


@contextlib.contextmanager
def tmpfs(
    path: Path,
    size: int,
    options: str = "mode=0700",
    needed: str = "a full disk needs a small tmpfs",
) -> Iterator[Path]:
    """A file system of ``size`` bytes at ``path``: a disk that fills up for real (``options``:
    more mount options). Mounting needs root (or CAP_SYS_ADMIN); the test is skipped where it
    cannot, saying what ``needed`` it."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},{options}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"{needed}, and mount failed: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)  # unmounted all the same
            raise AssertionError(f"{path} was still in use: a process was left writing there")


def left_in(directory: Path) -> list[str]:
    """What a failed backup or restore left in ``directory``, besides archives that verify."""
    left = []
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".tar"):
            backup("verify", str(path))  # a complete archive of the data as it is is fine
        else:
            left.append(path.name)
    return left


KiB = 1024


def test_create_on_a_full_disk_says_so_and_leaves_nothing(backup_dir, tmp_path):
    """Whether the disk fills up while the members are written or only when the manifest is
    (its place in the file is kept but not written until the end), create fails with exit 1
    and a plain message, and leaves neither an archive nor its temporary files."""
    seed()
    backup("create")
    size = only_archive(backup_dir).stat().st_size
    for n, room in enumerate(range(size // 2, size + 64 * KiB, 16 * KiB)):
        with tmpfs(tmp_path / f"disk{n}", room) as disk:
            try:
                printed = backup("create", "--output", str(disk))
            except CommandError as exc:
                assert exc.returncode == 1
                assert str(exc).startswith(f"No space left on device writing {disk}/")
                assert "no archive was written" in str(exc)
                assert list(disk.iterdir()) == []
                continue
            assert f"Created {only_archive(disk)}" in printed  # there was room after all
            backup("verify", str(only_archive(disk)))
            break


def test_short_writes_are_written_again_not_left_as_holes(backup_dir, monkeypatch):
    """``os.pwrite`` may write part of what it is given (a disk filling up writes what fits):
    the rest is written after, never skipped."""
    seed()
    real = os.pwrite

    def half(fd: int, data: Any, offset: int) -> int:
        return real(fd, bytes(data[: max(1, len(data) // 2)]), offset)

    monkeypatch.setattr(archive.os, "pwrite", half)
    backup("create", "--no-native")
    monkeypatch.undo()
    assert "OK" in backup("verify", str(only_archive(backup_dir)))


def test_restore_with_its_backup_disk_full_changes_nothing_and_says_why(
    backup_dir, tmp_path, settings
):
    """The safety backup, then (SQLite) the archive's database copy extracted beside it, fill
    the disk at one point or another: each time the restore stops with a plain message, the
    data as it was and nothing but complete archives left."""
    seeded = seed()
    backup("create")
    archived = only_archive(backup_dir)
    change_data(seeded["ana"])
    changed = snapshot()
    size = archived.stat().st_size
    for n, room in enumerate(range(size // 2, 3 * size, 16 * KiB)):
        with tmpfs(tmp_path / f"disk{n}", room) as disk:
            settings.TERMSYS_BACKUP_DIR = disk
            try:
                printed = backup("restore", str(archived), "--yes")
            except CommandError as exc:
                assert exc.returncode == 1
                assert "nothing changed" in str(exc)
                assert "No space left on device writing" in str(exc) or (
                    "preparing its SQLite copy" in str(exc)
                )
                assert snapshot() == changed
                assert left_in(disk) == []
                continue
            assert "row counts match the manifest" in printed
            break
    else:
        raise AssertionError("no room was enough")


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's write-ahead log")
def test_a_safety_backup_holds_the_rows_even_when_the_database_copy_fails(
    backup_dir, tmp_path, settings
):
    """A running server's read transaction keeps the write-ahead log from being emptied, so
    the safety backup copies the database with SQLite's backup API, which fails on a disk too
    small for the file. Then it holds the rows in the portable form instead, or the restore
    stops: never a safety backup without them."""
    seeded = seed()
    backup("create", "--no-native")
    archived = only_archive(backup_dir)
    change_data(seeded["ana"])
    changed = snapshot()
    name = connection.settings_dict["NAME"]
    reader = sqlite3.connect(name, isolation_level=None)
    writer = sqlite3.connect(name, isolation_level=None)
    with connection.cursor() as cursor:  # the checkpoint waits for the reader: not 20 s here
        cursor.execute("PRAGMA busy_timeout = 50")
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sessions_app_project").fetchone()
        writer.execute("UPDATE sessions_app_project SET name = name")  # after its snapshot
        database = Path(name).stat().st_size
        for n, room in enumerate(range(32 * KiB, database, 32 * KiB)):
            with tmpfs(tmp_path / f"disk{n}", room) as disk:
                settings.TERMSYS_BACKUP_DIR = disk
                try:
                    backup("restore", str(archived), "--yes")
                except CommandError as exc:
                    assert "the safety backup failed (No space left on device" in str(exc)
                    assert snapshot() == changed
                    assert list(disk.iterdir()) == []
                    continue
                (safety,) = disk.glob("*-safety.tar")
                shutil.copy(safety, tmp_path / "safety.tar")
                break
        else:
            raise AssertionError("no room was enough")
    finally:
        reader.rollback()
        reader.close()
        writer.close()
    safety = tmp_path / "safety.tar"
    manifest = archive.read_manifest(safety)
    assert manifest["portable"] and manifest["native"]["member"] is None
    assert "rows as: portable form" in backup("verify", str(safety))
    settings.TERMSYS_BACKUP_DIR = backup_dir
    backup("restore", str(safety), "--yes")
    assert snapshot() == changed


def test_an_archive_without_a_loadable_copy_of_its_rows_fails_verification(backup_dir, tmp_path):
    seed()
    backup("create", "--no-native")
    path = only_archive(backup_dir)

    def no_rows(manifest: dict) -> None:
        manifest["portable"], manifest["copies"] = False, None
        for entry in manifest["models"]:
            entry["member"] = entry["copy"] = None

    rewrite(path, no_rows, tmp=tmp_path, keep=lambda name: not name.startswith(("data/", "copy/")))
    message = refused("verify", str(path))
    assert message.startswith(f"{path}: the archive holds no loadable copy of its rows (")
    assert "holds no loadable copy of its rows" in backup("list")
    assert "neither the portable form" in refused("restore", str(path), "--yes")


def test_an_archive_never_reuses_nor_follows_files_put_where_it_is_written(tmp_path):
    """In a directory others may write in, files and links named as an archive's temporary
    file (as earlier versions named it) are left alone; the archive is the operator's own,
    mode 0600, whatever the umask."""
    seed()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    planted = []
    for ahead in range(6):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() + ahead))
        planted_file = shared / f".termsys-backup-{stamp}-nightly.tar.tmp"
        planted_file.write_text("theirs")
        planted_file.chmod(0o666)
        planted.append(planted_file)
        (shared / f".termsys-backup-{stamp}.tar.tmp").symlink_to(victim)
    umask = os.umask(0)
    try:
        backup("create", "--output", str(shared), "--label", "nightly")
        backup("create", "--output", str(shared))
    finally:
        os.umask(umask)
    archives = sorted(shared.glob("termsys-backup-*.tar"))
    assert len(archives) == 2
    for path in archives:
        assert path.stat().st_mode & 0o777 == 0o600
        assert not path.is_symlink()
        backup("verify", str(path))
    assert victim.read_text() == "not yours"
    for planted_file in planted:
        assert planted_file.read_text() == "theirs"
        assert planted_file.stat().st_mode & 0o777 == 0o666


class _PageCopyInterrupted:
    """Stands in for the ``sqlite3`` module in ``sqlite_native``: the page copy's backup gets
    a real SIGINT sent to this process after its first step, or as its last step commits."""

    def __init__(self, when: str) -> None:
        self.when, self.sent = when, False

    def __getattr__(self, name: str) -> Any:
        return getattr(sqlite3, name)

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return _Connection(sqlite3.connect(*args, **kwargs), self)


class _Connection:
    def __init__(self, real: sqlite3.Connection, signals: _PageCopyInterrupted) -> None:
        self.real, self.signals = real, signals

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def backup(self, target: Any, *, pages: int = -1, progress: Any = None, **kw: Any) -> None:
        def step(status: int, remaining: int, total: int) -> None:
            last = status == sqlite3.SQLITE_DONE
            if not self.signals.sent and (self.signals.when == "first step" or last):
                self.signals.sent = True
                os.kill(os.getpid(), signal.SIGINT)  # handled at once, as Ctrl-C would be
            if progress is not None:
                progress(status, remaining, total)

        self.real.backup(target, pages=pages, progress=step, **kw)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's page copy")
@pytest.mark.parametrize("when", ["first step", "last step"])
def test_ctrl_c_during_the_page_copy_is_told_truthfully(backup_dir, monkeypatch, when):
    """Before the page copy's last step, Ctrl-C rolls it back and the restore says that nothing
    changed; as the last step commits, the restore is done and says so, not "interrupted"."""
    from sessions_app.backup import sqlite_native

    seeded = seed()
    before = snapshot()
    backup("create")
    archived = only_archive(backup_dir)
    change_data(seeded["ana"])
    changed = snapshot()
    monkeypatch.setattr(sqlite_native, "PAGES_PER_STEP", 8)  # a copy of several steps
    monkeypatch.setattr(sqlite_native, "sqlite3", _PageCopyInterrupted(when))
    handler = signal.getsignal(signal.SIGINT)
    with opened_elsewhere():  # a server: its pages are copied, the file not swapped
        ctrl_c_during_the_page_copy(when, archived, backup_dir, before, changed)
    assert signal.getsignal(signal.SIGINT) is handler


@contextlib.contextmanager
def opened_elsewhere() -> Iterator[sqlite3.Connection]:
    """The database open on a connection of its own, as a running server has it."""
    server = sqlite3.connect(connection.settings_dict["NAME"])
    try:
        server.execute("SELECT count(*) FROM sessions_app_project").fetchone()
        yield server
    finally:
        server.close()


def ctrl_c_during_the_page_copy(when, archived, backup_dir, before, changed) -> None:
    if when == "first step":
        with pytest.raises(CommandError) as caught:
            backup("restore", str(archived), "--yes")
        assert caught.value.returncode == command.INTERRUPTED_STATUS
        message = str(caught.value)
        assert "interrupted before the data was replaced" in message
        assert "nothing changed" in message
        assert snapshot() == changed
        (safety,) = backup_dir.glob("*-safety.tar")
        assert f"The safety backup written meanwhile is {safety}." in message
    else:
        printed = backup("restore", str(archived), "--yes")
        assert services.INTERRUPT_TOO_LATE in printed
        (safety,) = backup_dir.glob("*-safety.tar")
        assert f"Restored {archived}" in printed and f"The data before is in {safety}" in printed
        assert snapshot() == before


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's database file")
def test_a_restore_while_a_server_has_the_database_open_copies_the_pages_into_it(backup_dir):
    """The file a running server has open is kept: the archive's pages are copied into it, and
    the server's own connection reads the restored data."""
    seeded = seed()
    before = snapshot()
    backup("create")
    archived = only_archive(backup_dir)
    change_data(seeded["ana"])
    inode = Path(connection.settings_dict["NAME"]).stat().st_ino
    with opened_elsewhere() as server:
        printed = backup("restore", str(archived), "--yes")
        names = server.execute("SELECT name FROM sessions_app_project ORDER BY id").fetchall()
    assert "rows from the SQLite copy, page for page" in printed
    assert snapshot() == before
    assert names == [
        (name,) for name in Project.objects.order_by("id").values_list("name", flat=True)
    ]
    assert Path(connection.settings_dict["NAME"]).stat().st_ino == inode


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's locks")
def test_a_refused_swap_keeps_the_locks_of_this_process_connections(tmp_path):
    """Closing any descriptor of a file drops every POSIX lock the process holds on it. The
    lease is asked for by a process of its own, so a connection here keeps its lock, and the
    next process to close the database does not take itself for the last one and remove the
    write-ahead log from under it ("disk I/O error" for every connection after)."""
    seed()
    name = connection.settings_dict["NAME"]
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).close()
    from sessions_app.backup import sqlite_native

    with opened_elsewhere() as server:
        assert sqlite_native.swap_in(other) == "the database is open (a running server?)"
        visitor = (
            "import sqlite3, sys; "
            "sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM sessions_app_project')"
        )
        subprocess.run([sys.executable, "-c", visitor, name], check=True)
        assert Path(f"{name}-wal").exists()
        assert server.execute("SELECT count(*) FROM sessions_app_project").fetchone() == (2,)
    assert Project.objects.count() == 2


def swap_scenario(name: str, work: Path) -> dict[str, Any]:
    """Run ``tests/swap_scenarios.py NAME``: on a database no thread of this process has open."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "swap_scenarios.py"), name, str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's database file")
def test_a_restore_swaps_the_file_in_and_a_process_opening_it_meanwhile_reads_no_old_data(
    tmp_path,
):
    """With the database open nowhere, the archive's copy becomes the database file. A process
    that opens the file meanwhile waits for the restore, then gets the replaced file, which
    SQLite refuses ("not a database"): it never reads the replaced data nor writes beside."""
    found = swap_scenario("swap", tmp_path)
    assert found["changed"] == ["changed", "web"]
    assert "rows from the SQLite copy, swapped in as the database file" in found["printed"]
    assert found["after"] == found["before"] == ["api", "web"]
    assert found["replaced"] and found["wal_bytes"] == 0
    waited = found["waited"]
    assert waited["returncode"] != 0 and "file is not a database" in waited["stderr"], waited
    assert found["opened_after"] == "api,web"


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's write-ahead log")
def test_no_file_is_swapped_over_a_write_ahead_log_that_holds_frames(tmp_path):
    """A writer killed before its checkpoint leaves frames in the log that the file does not
    hold; a file renamed over it would get them replayed into it by its next opener. The swap
    refuses, and the database keeps the killed writer's data."""
    found = swap_scenario("wal", tmp_path)
    assert found["wal_bytes"] > 0
    assert found["why"] == "its wal file holds data the database file does not"
    assert found["kept"] and found["after"] == ["killed", "web"]


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[Path]:
    """An existing directory this process cannot write in: read-only for an ordinary user, a
    read-only mount for root (whom permissions do not stop)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        try:
            yield path
        finally:
            path.chmod(0o700)
        return
    with tmpfs(path, 64 * 1024, options="ro", needed="root needs a read-only mount here"):
        yield path


def test_a_directory_that_cannot_be_written_in_is_named(backup_dir, tmp_path, settings):
    seed()
    backup("create")
    archived = only_archive(backup_dir)
    before = snapshot()
    with unwritable(tmp_path / "read-only") as directory:
        for place in (directory, Path("/proc")):
            message = refused("create", "--output", str(place))
            assert message.startswith(f"cannot write in the backup directory {place} (")
            settings.TERMSYS_BACKUP_DIR = place
            message = refused("restore", str(archived), "--yes")
            assert message.startswith(f"cannot write in the backup directory {place} (")
            assert snapshot() == before


# --- list, prune: damaged archives, names, leftovers --------------------------------------------


def test_prune_never_keeps_a_damaged_archive_in_place_of_a_good_one(backup_dir):
    seed()
    for label in ("good1", "good2", "newest"):
        backup("create", "--label", label)
    newest = next(backup_dir.glob("*-newest.tar"))
    flip_byte_in(newest, native_member(), at=100)  # found only by reading it whole
    assert "DAMAGED" not in backup("list")  # the quick check: headers and sizes
    listed = backup("list", "--verify")
    assert f"{newest.name}  DAMAGED (corrupt archive: member {native_member()} fails" in listed

    printed = backup("prune", "--keep", "1")
    assert f"left {newest.name} for an operator: corrupt archive" in printed
    assert "Pruned 1 archive(s); kept the newest 1 that verify (--keep 1)." in printed
    left = sorted(p.name for p in backup_dir.glob("termsys-backup-*.tar"))
    assert left == sorted([newest.name, next(backup_dir.glob("*-good2.tar")).name])


def native_member() -> str:
    return "native/db.sqlite3" if connection.vendor == "sqlite" else "native/db.pgdump"


def test_list_marks_damaged_archives_without_reading_them_whole(backup_dir):
    seed()
    backup("create", "--label", "cut")
    backup("create", "--label", "edited")
    cut, edited = (next(backup_dir.glob(f"*-{label}.tar")) for label in ("cut", "edited"))
    with cut.open("r+b") as fh:  # as a copy cut short by a full disk
        fh.truncate(cut.stat().st_size // 2)
    data = edited.read_bytes()  # the manifest edited by hand: still JSON, not what was summed
    edited.write_bytes(data.replace(b'"label": "edited"', b'"label": "edifed"', 1))
    listed = backup("list")
    cut_line = next(line for line in listed.splitlines() if line.startswith(cut.name))
    # Cut before or after its manifest (which side depends on the engine's members).
    assert cut_line.startswith(
        (f"{cut.name}  unreadable: not a termsys backup archive", f"{cut.name}  DAMAGED")
    ), cut_line
    assert (
        f"{edited.name}  DAMAGED (corrupt archive: manifest.json does not match "
        "manifest.sha256): do not rely on it"
    ) in listed


def test_list_and_prune_take_a_link_to_nowhere_for_unreadable(backup_dir):
    seed()
    backup("create")
    dangling = backup_dir / "termsys-backup-20260101T000000Z.tar"
    dangling.symlink_to(backup_dir / "gone.tar")
    listed = backup("list")
    assert f"{dangling.name}  unreadable: not a termsys backup archive" in listed
    assert "Pruned 0 archive(s)" in backup("prune", "--keep", "1")
    assert dangling.is_symlink()


def test_list_shows_labels_escaped(backup_dir):
    seed()
    label = "evil\x1b[2J\x1b]0;owned\x07\nnext line"
    backup("create", "--label", label)
    listed = backup("list")
    assert "\x1b" not in listed and "\x07" not in listed
    assert len(listed.splitlines()) == 1
    assert listed.rstrip("\n").endswith(r"evil\x1b[2J\x1b]0;owned\x07\nnext line")


def test_two_archives_written_at_once_under_one_name_are_both_kept(tmp_path):
    """Two creates in the same second with the same label: each writes a file of its own and
    ends with an archive of its own, never over the other's."""
    path = tmp_path / "termsys-backup-20260101T000000Z-r.tar"
    members = {}
    for n in (1, 2):
        members[n] = tmp_path / f"member{n}"
        members[n].write_bytes(bytes([n]) * 5000)
    manifest = {"format": archive.FORMAT, "version": archive.VERSION, "label": "r"}
    first = archive.Writer(path, archive.manifest_bound(manifest, ["data"]))
    second = archive.Writer(path, archive.manifest_bound(manifest, ["data"]))
    first.add("data", members[1])
    second.add("data", members[2])
    assert second.finish(manifest) == path
    assert first.finish(manifest) == tmp_path / "termsys-backup-20260101T000000Z-r-2.tar"
    for n, name in ((2, path), (1, first.path)):
        with archive.verified(name) as opened:
            assert opened.member("data").read() == bytes([n]) * 5000
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_archive_that_took_the_name_meanwhile_is_not_replaced(backup_dir, monkeypatch):
    seed()
    real = archive.Writer.finish
    taken: list[Path] = []

    def another_create_first(self: archive.Writer, manifest: dict) -> Path:
        if not taken:  # another create (same second, same label) finished meanwhile
            taken.append(self.path)
            self.path.write_bytes(b"the other archive")
        return real(self, manifest)

    monkeypatch.setattr(archive.Writer, "finish", another_create_first)
    printed = backup("create", "--label", "r")
    assert taken[0].read_bytes() == b"the other archive"
    path = backup_dir / taken[0].name.replace("-r.tar", "-r-2.tar")
    assert f"Created {path}" in printed
    backup("verify", str(path))


def test_leftovers_of_killed_backups_are_removed_once_their_process_is_gone(backup_dir):
    """A killed create or restore leaves a hidden working directory or temporary archive: the
    next create, restore or prune removes those no process holds, and says so."""
    seed()
    backup_dir.mkdir(parents=True, exist_ok=True)
    old = time.time() - 2 * leftovers.GRACE
    made = {}
    for name, is_dir in (
        (".backup-k1llz", True),
        (".restore-k1llz", True),
        (".termsys-backup-20260101T000000Z.tar.x1y2z3.tmp", False),
        (".backup-alive", True),
        (".termsys-backup-20260101T000001Z.tar.tmp", False),  # as versions before named it
    ):
        path = backup_dir / name
        if is_dir:
            path.mkdir()
            (path / "native.sqlite3").write_bytes(b"x" * 100)
        else:
            path.write_bytes(b"x" * 100)
        os.utime(path, (old, old))
        made[name] = path
    fresh = backup_dir / ".backup-just-made"
    fresh.mkdir()
    held = os.open(made[".backup-alive"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        import fcntl

        fcntl.flock(held, fcntl.LOCK_EX)  # its process still at work
        printed = backup("create")
        assert "removed leftovers of killed backups or restores" in printed
        gone = [
            ".backup-k1llz",
            ".restore-k1llz",
            ".termsys-backup-20260101T000000Z.tar.x1y2z3.tmp",
            ".termsys-backup-20260101T000001Z.tar.tmp",
        ]
        for name in gone:
            assert name in printed and not made[name].exists()
        assert made[".backup-alive"].exists() and fresh.exists()
    finally:
        os.close(held)
    assert "removed leftovers" in backup("prune", "--keep", "1")
    assert not made[".backup-alive"].exists() and fresh.exists()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's documents beside")
def test_prune_and_any_restore_drop_the_documents_table_a_killed_restore_left(backup_dir, tmp_path):
    seed()
    backup("create")
    path = only_archive(backup_dir)
    with connection.cursor() as cursor:  # as a restore killed mid-way leaves it
        cursor.execute(f"CREATE TABLE {swap.SIDE} (id bigint)")
    assert f"dropped {swap.SIDE}, left by a restore that was killed" in backup(
        "prune", "--keep", "5"
    )
    assert not swap_table_left()
    # A restore that rebuilds the documents (it does not load them beside) drops it too.
    rewrite(path, lambda m: m.update(search_index=None), tmp=tmp_path)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {swap.SIDE} (id bigint)")
    printed = backup("restore", str(path), "--yes")
    assert "search index rebuilt" in printed and f"dropped {swap.SIDE}" in printed
    assert not swap_table_left()


def test_ctrl_d_at_the_confirmation_is_no(backup_dir, monkeypatch):
    seed()
    backup("create")
    TerminalSession.objects.all().delete()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(""))  # input() meets the end of input
    assert command.DECLINED in backup("restore", str(only_archive(backup_dir)))
    assert TerminalSession.objects.count() == 0


def test_a_directory_given_as_the_archive_is_named_as_one(tmp_path):
    for subcommand in (["verify"], ["restore", "--yes"]):
        message = refused(subcommand[0], str(tmp_path), *subcommand[1:])
        assert f"{tmp_path}: not a termsys backup archive (it is a directory" in message
