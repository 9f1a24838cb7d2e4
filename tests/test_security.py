"""Bearer tokens (UNAUTHENTICATED / PERMISSION_DENIED, per-model scoping on every RPC including the
streaming ones), TLS with a CA made here, and mutual TLS refusing a client without a certificate."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import Client, OptserveError, PermissionDeniedError, UnauthenticatedError, optim
from optserve.client.model import Model
from optserve.server import Server
from optserve.server.api import auth as security
from optserve.server.core.errors import ConfigError

W = {"w": np.arange(4, dtype=np.float32)}
G = {"w": np.ones(4, np.float32)}

TOKENS = """\
# admin: every model
admin-secret
team-a-secret   model-a  shared   # only these two
"""


# -- tokens ---------------------------------------------------------------------------------------


def test_token_file_parsing(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKENS + "\n\n   # only a comment\n")
    tokens = security.load_tokens(str(path))
    assert [(t.secret, t.models) for t in tokens] == [
        (b"admin-secret", None),
        (b"team-a-secret", frozenset({"model-a", "shared"})),
    ]
    assert security.match_token(tokens, b"team-a-secret") is tokens[1]
    assert security.match_token(tokens, b"team-a-secre") is None
    assert security.match_token(tokens, b"") is None
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no tokens"):
        security.load_tokens(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(TOKENS)
    args = argparse.Namespace(token_file=str(path), tls_cert=None, tls_key=None, tls_client_ca=None)
    srv = Server(port=0, **security.server_options(args))  # what `optserve serve --token-file` does
    with srv.client(token="admin-secret", timeout=30) as admin:
        admin.create_model("model-a", W, optim.sgd(0.1))
        admin.create_model("model-b", W, optim.sgd(0.1))
    yield srv
    srv.stop(grace=1.0)


def _state(srv, name):
    with srv.client(token="admin-secret", timeout=30) as admin:
        m = admin.model(name)
        return m.info()["step"], m.pull()["w"]


@pytest.mark.parametrize("token", [None, "wrong-secret", "admin-secret-but-longer", "Bearer admin-secret"])
def test_missing_or_wrong_token_is_unauthenticated(token_server, token):
    before = _state(token_server, "model-a")
    with token_server.client(token=token, timeout=30) as c:
        for call in (
            c.list_models,
            c.rules,
            lambda: c.model("model-a"),
            lambda: Model(c, "model-a", None, None).push(G),
            lambda: Model(c, "model-a", None, None).pull(),
            lambda: Model(c, "model-a", None, None).push_pull(G),
            lambda: c.create_model("intruder", W, optim.sgd(0.1)),
            lambda: c.delete_model("model-a"),
        ):
            with pytest.raises(UnauthenticatedError) as e:
                call()
            assert ("missing" if token is None else "invalid") in str(e.value)
    after = _state(token_server, "model-a")
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    with token_server.client(token="admin-secret", timeout=30) as admin:
        assert "intruder" not in [m["name"] for m in admin.list_models()]


def test_token_for_another_model_is_permission_denied_on_every_rpc(token_server):
    before = _state(token_server, "model-b")
    with token_server.client(token="team-a-secret", timeout=30) as c:
        foreign = Model(c, "model-b", None, None)  # no GetModel first: each RPC must check on its own
        calls = {
            "GetModel": lambda: c.model("model-b"),
            "Push": lambda: foreign.push(G),
            "Pull": lambda: foreign.pull(),
            "PushPull": lambda: foreign.push_pull(G),
            "Pull(min_step)": lambda: foreign.pull(min_step=1000, timeout=30),
            "SetHyperparams": lambda: foreign.set_hyperparams(learning_rate=5.0),
            "DeleteModel": lambda: c.delete_model("model-b"),
            "CreateModel": lambda: c.create_model("model-c", W, optim.sgd(0.1)),
            "SaveCheckpoint": lambda: foreign.save(),
        }
        for rpc, call in calls.items():
            with pytest.raises(PermissionDeniedError, match="may not access") as e:
                call()
            assert "model-b" in str(e.value) or "model-c" in str(e.value), rpc
        # The scoped token works on its own models, and the listing shows only those.
        mine = c.model("model-a")
        step = mine.push(G)
        assert step >= 1
        assert [m["name"] for m in c.list_models()] == ["model-a"]
        assert len(c.rules()) > 0  # model-less calls are allowed
    after = _state(token_server, "model-b")
    assert after[0] == before[0] == 0 and np.array_equal(after[1], before[1])


def test_right_token_works_and_health_needs_none(token_server):
    with token_server.client(token="admin-secret", timeout=30) as admin:
        m = admin.model("model-b")
        out = m.push_pull(G)
        assert out["w"].shape == (4,)
        assert {"model-a", "model-b"} <= {x["name"] for x in admin.list_models()}
    with grpc.insecure_channel(token_server.address) as ch:  # probes carry no secret
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


# -- TLS ------------------------------------------------------------------------------------------


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_cn, key, issuer_cert, issuer_key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("optserve test CA", ca_key, None, None, ca=True)
    srv_key, cli_key = _key(), _key()
    other_key = _key()
    other_ca = _cert("someone else's CA", other_key, None, None, ca=True)
    return {
        "ca": _write(d / "ca.pem", ca),
        "server_cert": _write(d / "server.pem", _cert("127.0.0.1", srv_key, ca, ca_key, server=True)),
        "server_key": _write(d / "server.key", key=srv_key),
        "client_cert": _write(d / "client.pem", _cert("worker-1", cli_key, ca, ca_key)),
        "client_key": _write(d / "client.key", key=cli_key),
        "other_ca": _write(d / "other-ca.pem", other_ca),
        "rogue_cert": _write(d / "rogue.pem", _cert("rogue", cli_key, other_ca, other_key)),
    }


def _roundtrip(client: Client, name: str) -> None:
    m = client.create_model(name, W, optim.sgd(0.5))
    assert m.push(G) == 1
    np.testing.assert_allclose(m.pull()["w"], W["w"] - 0.5)


def test_tls_with_a_ca_made_here(pki):
    args = argparse.Namespace(
        token_file=None, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=None
    )
    with Server(port=0, **security.server_options(args)) as srv:
        with Client(srv.address, tls=pki["ca"], timeout=30) as c:
            _roundtrip(c, "tls-model")
        # A client that does not trust the CA, and a plaintext client, get nowhere.
        for kwargs in ({"tls": pki["other_ca"]}, {}):
            with Client(srv.address, timeout=30, **kwargs) as c, pytest.raises(OptserveError) as e:
                c.list_models()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_valid_certificate(pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("mtls-token\n")
    args = argparse.Namespace(
        token_file=str(tokens), tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    )
    with Server(port=0, **security.server_options(args)) as srv:
        good = {"ca": pki["ca"], "cert": pki["client_cert"], "key": pki["client_key"]}
        with Client(srv.address, tls=good, token="mtls-token", timeout=30) as c:
            _roundtrip(c, "mtls-model")
        with Client(srv.address, tls=good, timeout=30) as c, pytest.raises(UnauthenticatedError):
            c.list_models()  # certificate and token are both required
        rogue = {"ca": pki["ca"], "cert": pki["rogue_cert"], "key": pki["client_key"]}
        for tls in (pki["ca"], rogue):  # no certificate; one signed by another CA
            with Client(srv.address, tls=tls, token="mtls-token", timeout=30) as c, pytest.raises(OptserveError) as e:
                c.list_models()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_server_options_reject_half_configured_tls(pki):
    def opts(**kw):
        base = {"token_file": None, "tls_cert": None, "tls_key": None, "tls_client_ca": None}
        return security.server_options(argparse.Namespace(**{**base, **kw}))

    with pytest.raises(ConfigError, match="--tls-cert needs --tls-key"):
        opts(tls_cert=pki["server_cert"])
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        opts(tls_client_ca=pki["ca"])
    assert opts() == {}
    assert os.path.exists(pki["ca"])
