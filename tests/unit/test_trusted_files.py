"""The files that say who may call the broker (the configuration, ``[auth] tokens_file``,
the TLS files) are refused at start when someone other than root or the broker's user could
have written them (airlock_broker/security/trusted_files.py).

Found in review: with ``tokens_file`` in a world-writable directory, ``nobody`` replaced it
with one holding an ``admin`` token of their own, and the restarted broker let them drain
the pools."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airlock_broker.config import BrokerConfig
from airlock_broker.security.auth_config import load_tokens_file, token_digest
from tests.unit.shared_tmp import STRANGER

TOKENS = (f'[[auth.tokens]]\nprincipal = "ci-batch2"\nroles = ["admin", "convert"]\n'
          f'sha256 = "{token_digest("airlock_" + "x" * 43)}"\n')


def _files(directory: Path, tokens_dir: Path | None = None) -> tuple[Path, Path]:
    """A configuration in ``directory`` naming a tokens file in ``tokens_dir`` (the same by
    default)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens_dir = tokens_dir or directory
    tokens_dir.mkdir(parents=True, exist_ok=True)
    tokens = tokens_dir / "tokens.toml"
    tokens.write_text(TOKENS)
    config = directory / "broker.toml"
    config.write_text(f'[auth]\ntokens_file = "{tokens}"\n')
    return config, tokens


def test_files_only_root_could_write_are_read(tmp_path: Path) -> None:
    config, tokens = _files(tmp_path / "etc")
    assert [t.principal for t in load_tokens_file(tokens)] == ["ci-batch2"]
    assert BrokerConfig.load(config).auth.tokens
    link = tmp_path / "etc" / "current.toml"  # configuration management's links are followed
    link.symlink_to(tokens)
    assert load_tokens_file(link)


@pytest.mark.parametrize("change", ["directory 0777", "file 0666", "file another user's",
                                    "link into a directory 0777"])
def test_a_file_someone_else_could_have_written_is_refused(tmp_path: Path,
                                                           change: str) -> None:
    config, tokens = _files(tmp_path / "etc", tmp_path / "tokens")
    if change == "directory 0777":
        os.chmod(tmp_path / "tokens", 0o777)
    elif change == "file 0666":
        os.chmod(tokens, 0o666)
    elif change == "file another user's":
        os.chown(tokens, STRANGER, STRANGER)
    else:
        shared = tmp_path / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        os.replace(tokens, shared / "tokens.toml")
        tokens.symlink_to(shared / "tokens.toml")
    with pytest.raises(ValueError, match=r"\[auth\] tokens_file .*(writable by others|owned "
                                         r"by uid 4242)") as caught:
        BrokerConfig.load(config)
    assert ("chmod go-w" in str(caught.value)) is (change != "file another user's")


def test_a_configuration_file_someone_else_could_have_written_is_refused(
        tmp_path: Path) -> None:
    config, _ = _files(tmp_path / "etc")
    os.chmod(config, 0o646)
    with pytest.raises(ValueError, match="the configuration file .* is writable by others "
                                         r"\(mode 0646\).*chmod go-w"):
        BrokerConfig.load(config)


def test_the_broker_will_not_start_on_such_a_file(tmp_path: Path) -> None:
    """What an operator sees: one line and the usage exit code, before anything starts. (No
    engine is reachable from the test's broker: a broker that took the file would stop at
    once instead of serving.)"""
    import subprocess
    import sys

    config, tokens = _files(tmp_path / "etc")
    os.chmod(tokens, 0o666)
    done = subprocess.run(
        [sys.executable, "-m", "airlock_broker", "serve", "--config", str(config),
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
             "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}"})
    assert done.returncode == 2, done.stderr
    assert "bad configuration" in done.stderr and "tokens_file" in done.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("where", ["sticky directory", "directory of another user"])
def test_the_directories_above_are_judged_as_the_state_roots_are(tmp_path: Path,
                                                                  where: str) -> None:
    parent = tmp_path / "parent"
    config, tokens = _files(tmp_path / "etc", parent)
    if where == "sticky directory":  # /tmp's kind: no one else may rename the file away
        os.chmod(parent, 0o1777)
        assert load_tokens_file(tokens)
        return
    os.chown(parent, STRANGER, STRANGER)
    with pytest.raises(ValueError, match="owned by uid 4242, who could move it away"):
        BrokerConfig.load(config)


def test_the_tls_files_are_checked_too(tmp_path: Path) -> None:
    """The key and the CA decide who the broker is and whom it believes."""
    import subprocess

    from airlock_broker.security.auth_config import AuthConfig

    etc = tmp_path / "etc"
    etc.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(etc / "server.key"),
                    "-out", str(etc / "server.crt"), "-days", "1", "-subj", "/CN=broker"],
                   check=True, capture_output=True, timeout=60)
    assert AuthConfig(tls_cert=etc / "server.crt", tls_key=etc / "server.key").tls
    os.chmod(etc / "server.key", 0o662)
    with pytest.raises(ValueError, match=r"\[auth\] tls_key .* is writable by others"):
        AuthConfig(tls_cert=etc / "server.crt", tls_key=etc / "server.key")
