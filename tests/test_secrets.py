"""The Redis password: from the config, an environment variable or a file, read where the job runs
(the driver), carried to the actors inside the Redis URL only, and never written to the run folder's
config.yaml, the actors' config or the log. Also: the KubeRay manifests mount the Secret on the head
and pass a path, not a `$VARIABLE` that the submitter pod's shell would expand to nothing."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import yaml

from cluster.local import redis_session, with_password
from common.config import ConfigError, ReplayConfig, load_config, redacted_dump

ROOT = Path(__file__).resolve().parent.parent
TOY = "configs/toy.yaml"
# Every character that breaks a URL, a shell word, YAML or redis.conf quoting, and one non-ASCII.
AWKWARD = "a b=c@d:e/f%g#h?i&j\"k'l\\m\tü"


# -- sources: one at most, never empty, read at resolve time -----------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["replay.redis_password=x", "replay.redis_password_env=X"],
        ["replay.redis_password=x", "replay.redis_password_file=/run/x"],
        ["replay.redis_password_env=X", "replay.redis_password_file=/run/x"],
    ],
)
def test_password_sources_are_mutually_exclusive(overrides):
    with pytest.raises(ConfigError, match="at most one of") as err:
        load_config(TOY, overrides)
    for text in overrides:
        assert text.split("=")[0] in str(err.value)  # names both keys


@pytest.mark.parametrize("key", ["redis_password", "redis_password_env", "redis_password_file"])
def test_an_empty_source_is_refused_at_load(key):
    # What `replay.redis_password=$ARCOPO_REDIS_PASSWORD` became in a submitter pod without the Secret:
    # it used to load as "" and run with no password.
    with pytest.raises(ConfigError, match=rf"replay.{key} is empty"):
        load_config(TOY, [f"replay.{key}="])


def test_env_source_must_be_a_name_and_a_value_is_not_echoed():
    secret = "s3cr3t-" + uuid.uuid4().hex  # what `replay.redis_password_env=$VAR` expands to
    with pytest.raises(ConfigError, match="name of an environment variable") as err:
        load_config(TOY, [f"replay.redis_password_env={secret}"])
    assert secret not in str(err.value)
    assert load_config(TOY, ["replay.redis_password_env=ARCOPO_REDIS_PASSWORD"]).replay.redis_password_env


@pytest.mark.parametrize("value", ["123456", "true", "null", "@bc", "a b", "x=y==", AWKWARD, " lead", "trail\n"])
def test_password_from_env_is_the_variable_exactly(monkeypatch, value):
    cfg = load_config(TOY, ["replay.redis_password_env=ARCOPO_TEST_REDIS_PASSWORD"]).replay
    monkeypatch.setenv("ARCOPO_TEST_REDIS_PASSWORD", value)
    assert cfg.resolve_password() == value  # a string, exactly; no YAML, no stripping


def test_missing_or_empty_variable_names_key_and_variable(monkeypatch):
    cfg = ReplayConfig(redis_password_env="ARCOPO_TEST_REDIS_PASSWORD")
    monkeypatch.delenv("ARCOPO_TEST_REDIS_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="replay.redis_password_env: environment variable ARCOPO_TEST_REDIS_PASSWORD"):
        cfg.resolve_password()
    monkeypatch.setenv("ARCOPO_TEST_REDIS_PASSWORD", "")
    with pytest.raises(ConfigError, match="ARCOPO_TEST_REDIS_PASSWORD is empty"):
        cfg.resolve_password()


@pytest.mark.parametrize(
    ("content", "password"),
    [
        (b"pw", "pw"),  # a Kubernetes Secret file: no newline
        (b"pw\n", "pw"),  # an editor's: one newline, stripped
        (b"pw\n\n", "pw\n"),  # only one
        (b"pw\r\n", "pw\r"),  # a CR is a character of the password
        (b" 123456 ", " 123456 "),
        (b"null", "null"),
        (AWKWARD.encode(), AWKWARD),
    ],
)
def test_password_from_file_is_its_bytes_less_one_newline(tmp_path, content, password):
    path = tmp_path / "password"
    path.write_bytes(content)
    cfg = load_config(TOY, [f"replay.redis_password_file={path}"]).replay
    assert cfg.resolve_password() == password


def test_unreadable_file_names_key_and_path_never_content(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"replay.redis_password_file: {missing} cannot be read"):
        ReplayConfig(redis_password_file=missing).resolve_password()
    for content, what in [(b"", "is empty"), (b"\n", "is empty"), (b"\xff\xfesecret-bytes", "is not UTF-8")]:
        path = tmp_path / "password"
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=what) as err:
            ReplayConfig(redis_password_file=path).resolve_password()
        assert str(path) in str(err.value) and "secret-bytes" not in str(err.value)


# -- into the URL, and only there --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:6380/0", "redis://:a%20b%3Dc%40d@h:6380/0"),
        ("rediss://arcopo@h:6380/0?ssl_ca_certs=/x@y", "rediss://arcopo:a%20b%3Dc%40d@h:6380/0?ssl_ca_certs=/x@y"),
        ("redis://u:own@h:6380/0", "redis://u:own@h:6380/0"),  # the URL's own password wins
    ],
)
def test_password_goes_into_the_url_encoded(url, expected):
    assert with_password(url, "a b=c@d") == expected
    assert with_password(url, None) == url


def _no_secret_anywhere(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text


@pytest.mark.cluster  # a real redis-server
@pytest.mark.parametrize("source", ["env", "file", "literal"])
def test_the_job_reads_the_secret_and_the_actors_never_need_it(tmp_path, monkeypatch, caplog, source):
    """An external Redis whose password is AWKWARD: the driver's session reads it, the URL it hands to the
    actors carries it, an actor without the variable or file connects with it, and neither config.yaml,
    the actors' config dict nor the log contains it."""
    from common.dataflow.redis_server import EmbeddedRedis
    from common.dataflow.replay import ReplayBuffer
    from tests.helpers import group

    secret = AWKWARD + uuid.uuid4().hex
    with EmbeddedRedis(tmp_path / "redis", password=secret) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        if source == "env":
            monkeypatch.setenv("ARCOPO_TEST_REDIS_PASSWORD", secret)
            override = "replay.redis_password_env=ARCOPO_TEST_REDIS_PASSWORD"
        elif source == "file":
            (tmp_path / "password").write_text(secret + "\n")
            override = f"replay.redis_password_file={tmp_path / 'password'}"
        else:
            override = None
        overrides = [f"replay.redis_url={url}", f"run.output_dir={tmp_path}"] + ([override] if override else [])
        config = load_config(TOY, overrides)
        if source == "literal":
            config.replay.redis_password = secret  # as a YAML config file would give it
        caplog.set_level(logging.DEBUG)
        with redis_session(config, tmp_path / "run") as endpoint:
            logging.getLogger("arcopo").info("redis: %s", endpoint.display)  # what cluster.train logs
            driver = ReplayBuffer(endpoint.url, "secrets")  # the driver's monitor
            item = driver.insert(group(1))
            # An actor: the config dict it is given and the URL; no variable, no file on its node.
            actor_config = config.model_dump(mode="json")
            monkeypatch.delenv("ARCOPO_TEST_REDIS_PASSWORD", raising=False)
            (tmp_path / "password").unlink(missing_ok=True)
            actor_replay = ReplayConfig.model_validate(actor_config["replay"])
            actor = ReplayBuffer.from_config(actor_replay, endpoint.url, "secrets")
            assert actor.ids() == [item] and actor.get(item).group_id == group(1).group_id
            text = yaml.safe_dump(redacted_dump(config))  # runs/<name>/config.yaml
            if source != "literal":
                _no_secret_anywhere(secret, yaml.safe_dump(actor_config))
            _no_secret_anywhere(secret, text, endpoint.display, repr(actor), repr(server), caplog.text)
            driver.close()
            actor.close()


@pytest.mark.cluster
def test_an_actor_given_a_url_without_password_reads_its_own_source(tmp_path, monkeypatch):
    from common.dataflow.redis_server import EmbeddedRedis
    from common.dataflow.replay import ReplayBuffer, ReplayError

    with EmbeddedRedis(tmp_path / "redis", password="123456") as server:
        cfg = ReplayConfig(redis_url=f"redis://127.0.0.1:{server.port}/0", redis_password_env="ARCOPO_TEST_REDIS_PW")
        monkeypatch.setenv("ARCOPO_TEST_REDIS_PW", "123456")
        buf = ReplayBuffer.from_config(cfg, None, "own")
        assert buf.size() == 0
        buf.close()
        monkeypatch.setenv("ARCOPO_TEST_REDIS_PW", "wrong")
        with pytest.raises(ReplayError, match="credentials"):
            ReplayBuffer.from_config(cfg, None, "own").size()


def test_a_missing_source_fails_the_session_before_anything_connects(tmp_path, monkeypatch):
    monkeypatch.delenv("ARCOPO_TEST_REDIS_PW", raising=False)
    config = load_config(
        TOY, ["replay.redis_url=redis://127.0.0.1:1/0", "replay.redis_password_env=ARCOPO_TEST_REDIS_PW"]
    )
    with pytest.raises(ConfigError, match="replay.redis_password_env: environment variable ARCOPO_TEST_REDIS_PW"):
        with redis_session(config, tmp_path):
            pass


# -- the manifests: a Secret file on the head, a path on the command line ---------------------------


def _head(spec: dict) -> tuple[dict, dict]:
    pod = spec["headGroupSpec"]["template"]["spec"]
    return pod["containers"][0], {v["name"]: v for v in pod.get("volumes", [])}


def test_kuberay_mounts_the_redis_secret_on_the_head_and_passes_its_path():
    from deploy.validate import load_entrypoint_config

    rayjob = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
    raycluster = yaml.safe_load((ROOT / "deploy/kuberay/raycluster.yaml").read_text())
    entrypoint = rayjob["spec"]["entrypoint"]
    # The submitter pod's shell would expand a $VARIABLE where the Secret is not (to nothing).
    assert "$" not in entrypoint
    config = load_entrypoint_config(entrypoint)
    assert config.replay.redis_password is None and config.replay.redis_password_env is None
    path = Path(config.replay.redis_password_file)
    for spec in (rayjob["spec"]["rayClusterSpec"], raycluster["spec"]):
        container, volumes = _head(spec)
        env = {e["name"] for e in container.get("env", [])}
        assert not any("REDIS_PASSWORD" in name for name in env)  # not inherited by every head process
        mounts = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
        assert len(mounts) == 1, f"{path} is not on a volume of the head"
        secret = volumes[mounts[0]["name"]]["secret"]
        assert secret["secretName"] == "arcopo-redis"
        keys = {i["path"]: i["key"] for i in secret.get("items", [])}
        assert keys.get(str(path.relative_to(mounts[0]["mountPath"])), path.name) == "password"
        # Only the head holds it: rollout and learner pods talk to Redis with the URL the driver gives them.
        for group in spec["workerGroupSpecs"]:
            names = {v.get("secret", {}).get("secretName") for v in group["template"]["spec"].get("volumes", [])}
            assert "arcopo-redis" not in names
