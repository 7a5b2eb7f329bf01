"""Passwords in URLs are hidden by one function, whatever the scheme and wherever in the URL."""

from __future__ import annotations

import pytest

from bench.credentials import hides_credentials, masked, unmasked

SECRET = "s3cret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://bench:s3cret@db:5432/optuna", "postgresql+psycopg://bench:***@db:5432/optuna"),
        ("mysql+pymysql://bench:s3cret@db/optuna", "mysql+pymysql://bench:***@db/optuna"),
        ("http://bench:s3cret@mlflow:5000", "http://bench:***@mlflow:5000"),
        ("postgresql://bench:s3cret@db:port/optuna", "postgresql://bench:***@db:port/optuna"),  # SQLAlchemy refuses it
        ("postgresql://bench:s3@cret@db/optuna?x=a@b", "postgresql://bench:***@db/optuna?x=a@b"),  # '@' unencoded
        ("postgresql://bench:s3/?cret@db/optuna", "postgresql://bench:***@db/optuna"),
        ("postgresql://bench@db/optuna?password=s3cret", "postgresql://bench@db/optuna?password=***"),
        (
            "postgresql://bench@db/optuna?sslmode=require&sslpassword=s3cret&application_name=bench",
            "postgresql://bench@db/optuna?sslmode=require&sslpassword=***&application_name=bench",
        ),
        ("http://mlflow:5000/?token=s3cret#top", "http://mlflow:5000/?token=***#top"),
        (
            "cannot open postgresql://bench:s3cret@db/optuna: refused; see --storage=mysql://a:s3cret@b/c",
            "cannot open postgresql://bench:***@db/optuna: refused; see --storage=mysql://a:***@b/c",
        ),
    ],
)
def test_masked_hides_every_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert masked(url) == shown and SECRET not in shown
    assert masked(shown) == shown and hides_credentials(shown) and not hides_credentials(url)
    assert unmasked(shown, url) == url


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////tmp/results/optuna.db",
        "results/optuna.log",
        "postgresql://bench@db:5432/optuna",
        "http://127.0.0.1:5000",
        "file:///tmp/mlruns",
        "error at http://127.0.0.1:9: refused; mail bench@example.org",
    ],
)
def test_text_without_credentials_is_unchanged(url: str) -> None:
    assert masked(url) == url and not hides_credentials(url)
    assert unmasked(url, None) == url


def test_unmasked_takes_the_password_only_from_the_same_url() -> None:
    shown = "postgresql://bench:***@db/mlflow"
    assert unmasked(shown, "postgresql://bench:s3cret@db/mlflow") == "postgresql://bench:s3cret@db/mlflow"
    assert unmasked(shown, "postgresql://bench:s3cret@other-db/mlflow") is None
    assert unmasked(shown, None) is None
