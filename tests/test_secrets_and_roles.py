"""Secrets as files (``FITNAS_<NAME>_FILE``), ``fitnas db upgrade`` making Optuna's
schema and a read-only role for the dashboard, and the dashboard taking its storage URL
from the environment so that no password is on its command line."""

from __future__ import annotations

import uuid

import pytest
from conftest import PG_URL, _pg_admin_engine, create_pg_database, drop_pg_database
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def test_a_setting_from_a_file(tmp_path, monkeypatch):
    from service.settings import Settings

    secret = tmp_path / "db_url"
    secret.write_text(f"sqlite:///{tmp_path}/from-file.db\n")
    monkeypatch.delenv("FITNAS_DATABASE_URL", raising=False)
    monkeypatch.setenv("FITNAS_DATABASE_URL_FILE", str(secret))
    assert Settings().database_url == f"sqlite:///{tmp_path}/from-file.db"
    monkeypatch.setenv("FITNAS_DATABASE_URL", "sqlite:///plain.db")  # the plain one wins
    assert Settings().database_url == "sqlite:///plain.db"
    monkeypatch.delenv("FITNAS_DATABASE_URL")
    monkeypatch.setenv("FITNAS_DATABASE_URL_FILE", str(tmp_path / "missing"))
    result = runner.invoke(app, ["db", "current"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: FITNAS_DATABASE_URL_FILE=")


def test_upgrade_makes_optunas_schema_too(tmp_path, monkeypatch):
    import optuna

    db = f"sqlite:///{tmp_path}/fitnas.db"
    monkeypatch.setenv("FITNAS_DATABASE_URL", db)
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    optuna_db = f"sqlite:///{tmp_path}/fitnas-optuna.db"
    assert optuna.get_all_study_names(optuna_db) == []  # the schema is there, empty


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="FITNAS_TEST_POSTGRES_URL is not set")
def test_readonly_role_reads_every_table_and_writes_none(monkeypatch):
    import optuna

    url = create_pg_database()
    role = f"fitnas_ro_{uuid.uuid4().hex[:8]}"
    try:
        monkeypatch.setenv("FITNAS_DATABASE_URL", url)
        monkeypatch.setenv("FITNAS_READONLY_PASSWORD", "s3cret")
        result = runner.invoke(app, ["db", "upgrade", "--readonly-role", role])
        assert result.exit_code == 0, result.output
        assert f"read-only role {role!r}" in result.output
        # again: idempotent (the role exists)
        assert runner.invoke(app, ["db", "upgrade", "--readonly-role", role]).exit_code == 0
        optuna.create_study(storage=url, study_name="made-later")  # after the grants
        ro_url = make_url(url).set(username=role, password="s3cret")
        engine = create_engine(ro_url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM fitnas_jobs")).scalar() == 0
                assert conn.execute(text("SELECT study_name FROM studies")).scalars().all() \
                    == ["made-later"]
            with engine.connect() as conn, pytest.raises(Exception, match="permission"):
                conn.execute(text("DELETE FROM studies"))
        finally:
            engine.dispose()
        # the dashboard opens the storage as that role
        assert optuna.get_all_study_names(ro_url.render_as_string(hide_password=False)) \
            == ["made-later"]
    finally:
        drop_pg_database(url)
        admin = _pg_admin_engine()
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        finally:
            admin.dispose()


def test_readonly_role_needs_postgres_and_a_password(tmp_path, monkeypatch):
    monkeypatch.setenv("FITNAS_DATABASE_URL", f"sqlite:///{tmp_path}/fitnas.db")
    monkeypatch.delenv("FITNAS_READONLY_PASSWORD", raising=False)
    monkeypatch.setenv("FITNAS_READONLY_PASSWORD", "x")
    result = runner.invoke(app, ["db", "upgrade", "--readonly-role", "ro"])
    assert result.exit_code == 2 and "needs PostgreSQL" in result.output


def test_dashboard_storage_from_the_environment(tmp_path, monkeypatch):
    import optuna
    import optuna_dashboard

    db = tmp_path / "fitnas.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    secret = tmp_path / "dashboard_url"
    secret.write_text(f"sqlite:///{db}\n")
    served = {}
    monkeypatch.setattr(optuna_dashboard, "run_server",
                        lambda storage, host, port, artifact_store=None:
                        served.update(store=artifact_store))
    monkeypatch.setenv("FITNAS_DASHBOARD_STORAGE_URL_FILE", str(secret))
    (tmp_path / "arts").mkdir()
    result = runner.invoke(app, ["dashboard", "--artifact-dir", str(tmp_path / "arts")])
    assert result.exit_code == 0, result.output
    assert str(db) in result.output and served["store"] is not None
