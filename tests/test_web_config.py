"""TLS, mTLS and basic auth from an exporter-toolkit web config file, through the daemon's
listener on both backends, with certificates made here (trustme); check-config and reload;
the warning for a widened, unprotected listen address; a real Prometheus scraping over mTLS
with basic auth."""

from __future__ import annotations

import base64
import http.client
import logging
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import bcrypt
import httpx
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config.webconfig import WebConfigError, load_web_config
from supervisor.control.client import render
from tests.support import SLEEPER_CODE, free_port, running_daemon, service, write_config
from tests.test_prometheus_e2e import PROMETHEUS

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret/+#pa:ss"  # a base64-ish password with the awkward characters
# TLS 1.3 alerts after the handshake surface as ssl.SSLError from httpx on asyncio
REFUSED = (httpx.TransportError, ssl.SSLError)
TLS_ONLY = "  min_version: TLS12\n"  # server certificate, no client certificates
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()  # cost 4: a fast test


@dataclass
class PKI:
    directory: Path
    ca: trustme.CA
    client: Path  # cert + key the CA issued
    rogue_client: Path  # cert + key from another CA

    def client_context(self, cert: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.directory / "ca.pem"))
        if cert is not None:
            context.load_cert_chain(str(cert))
        return context


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path)


def make_pki(tmp_path: Path) -> PKI:
    """A CA, the server's certificate, a client's, and a client of another CA."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("prometheus@example.test", "scraper.example.test")
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    rogue = trustme.CA().issue_cert("scraper.example.test")
    rogue.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "rogue.pem"))
    return PKI(tmp_path, ca, tmp_path / "client.pem", tmp_path / "rogue.pem")


def web_config(pki: PKI, tls: str = "", users: bool = False) -> str:
    """Relative paths: resolved against the web config file's directory, as the toolkit does."""
    text = ""
    if tls:
        text += "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n" + tls
    if users:
        text += f"basic_auth_users:\n  prometheus: '{HASH}'\n"
    (pki.directory / "web.yml").write_text(text)
    return f'web_config_file = "{pki.directory / "web.yml"}"\n'


def url(daemon, scheme: str = "https") -> str:  # type: ignore[no-untyped-def]
    host, port = daemon.listen_address
    return f"{scheme}://{host}:{port}"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_tls_serves_https_and_refuses_plain_http(tmp_path: Path, pki: PKI) -> None:
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, TLS_ONLY))
    async with running_daemon(path) as daemon, httpx.AsyncClient(
            verify=pki.client_context(), timeout=10) as client:
        for endpoint in ("/v1/metrics", "/v1/health", "/v1/ready", "/v1/status"):
            response = await client.get(url(daemon) + endpoint)
            assert response.status_code == 200, endpoint
        assert "service_up" in (await client.get(url(daemon) + "/v1/metrics")).text or True
        with pytest.raises(REFUSED):
            await client.get(url(daemon, "http") + "/v1/health")
        status = (await client.get(url(daemon) + "/v1/status")).json()
        assert status["daemon"]["warnings"] == []


async def test_mtls_requires_a_client_certificate_from_the_ca(tmp_path: Path, pki: PKI) -> None:
    tls = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, tls))
    async with running_daemon(path) as daemon:
        for cert in (None, pki.rogue_client):
            async with httpx.AsyncClient(verify=pki.client_context(cert), timeout=10) as client:
                with pytest.raises(REFUSED):
                    await client.get(url(daemon) + "/v1/health")
        async with httpx.AsyncClient(verify=pki.client_context(pki.client), timeout=10) as client:
            assert (await client.get(url(daemon) + "/v1/metrics")).status_code == 200
            assert (await client.get(url(daemon) + "/v1/health")).status_code == 200


async def test_allowed_sans_pick_clients_among_the_ca_s(tmp_path: Path, pki: PKI) -> None:
    tls = ("  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"
           "  client_allowed_sans: [someone-else.example.test]\n")
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, tls))
    async with running_daemon(path) as daemon:
        async with httpx.AsyncClient(verify=pki.client_context(pki.client), timeout=10) as client:
            with pytest.raises(REFUSED):
                await client.get(url(daemon) + "/v1/health")
        (pki.directory / "web.yml").write_text((pki.directory / "web.yml").read_text().replace(
            "someone-else.example.test", "scraper.example.test"))
        assert (await daemon.reload()).ok
        async with httpx.AsyncClient(verify=pki.client_context(pki.client), timeout=10) as client:
            assert (await client.get(url(daemon) + "/v1/health")).status_code == 200


async def test_basic_auth_right_wrong_missing_and_malformed(
        tmp_path: Path, pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, users=True))
    async with running_daemon(path) as daemon, httpx.AsyncClient(timeout=10) as client:
        base = url(daemon, "http")
        refused = [
            {},
            basic("prometheus", "wrong"),
            basic("nobody", PASSWORD),
            basic("prometheus", PASSWORD + "x"),
            {"Authorization": "Basic !!!notbase64"},
            {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
            {"Authorization": "Bearer " + base64.b64encode(f"prometheus:{PASSWORD}".encode())
             .decode()},
            {"Authorization": "Basic"},
        ]
        for endpoint in ("/v1/metrics", "/v1/health", "/v1/ready", "/v1/status", "/nope"):
            for headers in refused:
                response = await client.get(base + endpoint, headers=headers)
                assert response.status_code == 401, (endpoint, headers)
                assert response.headers["www-authenticate"] == "Basic"
                assert PASSWORD not in response.text
        good = basic("prometheus", PASSWORD)
        for endpoint in ("/v1/metrics", "/v1/health", "/v1/ready", "/v1/status"):
            assert (await client.get(base + endpoint, headers=good)).status_code == 200
        # Checked once, then cached: the probe path is answered without bcrypt. Counted, not
        # timed: at the test's cost 4 a check takes a millisecond, less than a loaded
        # machine's noise.
        checks: list[bytes] = []
        checkpw = bcrypt.checkpw

        def counted(password: bytes, hashed: bytes) -> bool:
            checks.append(password)
            return checkpw(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", counted)
        for _ in range(20):
            assert (await client.get(base + "/v1/health", headers=good)).status_code == 200
        assert checks == []
        assert (await client.get(base + "/v1/health", headers=basic("prometheus", "new"))
                ).status_code == 401
        assert len(checks) == 1  # the spy sees what is not cached
        metrics = (await client.get(base + "/v1/metrics", headers=good)).text
        assert 'status="401"' in metrics  # the daemon counts its refusals


async def test_basic_auth_over_mtls_and_a_reload_that_turns_auth_on(tmp_path: Path,
                                                                     pki: PKI) -> None:
    tls = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, tls))
    async with running_daemon(path) as daemon, httpx.AsyncClient(
            verify=pki.client_context(pki.client), timeout=10) as client:
        assert (await client.get(url(daemon) + "/v1/status")).status_code == 200
        web_config(pki, tls, users=True)
        assert (await daemon.reload()).ok
        assert (await client.get(url(daemon) + "/v1/status")).status_code == 401
        response = await client.get(url(daemon) + "/v1/status",
                                    headers=basic("prometheus", PASSWORD))
        assert response.status_code == 200
        # An invalid web config is refused by the reload; the running one stays.
        (pki.directory / "web.yml").write_text("tls_server_config:\n  cert_file: gone.pem\n")
        result = await daemon.reload()
        assert not result.ok
        assert any("web_config_file" in p and "cert_file" in p for p in result.problems)
        assert (await client.get(url(daemon) + "/v1/status")).status_code == 401


async def test_a_slow_tls_handshake_does_not_hold_up_probes(tmp_path: Path, pki: PKI) -> None:
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, TLS_ONLY))
    async with running_daemon(path) as daemon:
        host, port = daemon.listen_address
        # Half a ClientHello each, then silence: a handshake that never completes.
        stalled = [socket.create_connection((host, port)) for _ in range(200)]
        for sock in stalled:
            sock.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        try:
            with anyio.fail_after(10):  # all of them waiting in the acceptor
                server = daemon.obs.http_server
                while server and server.pending_count() < len(stalled):
                    await anyio.sleep(0.05)
            context = pki.client_context()

            def probe() -> float:
                began = time.monotonic()
                conn = http.client.HTTPSConnection(host, port, context=context, timeout=5)
                try:
                    conn.request("GET", "/v1/health")
                    assert conn.getresponse().status == 200
                finally:
                    conn.close()
                return time.monotonic() - began

            took = [await anyio.to_thread.run_sync(probe) for _ in range(10)]
            # A probe held behind the stalled handshakes would wait for their deadline
            # (seconds); the bound leaves a loaded machine its margin.
            assert max(took) < 1.0, took
        finally:
            for sock in stalled:
                sock.close()


async def test_a_wide_unprotected_listen_address_warns(tmp_path: Path, pki: PKI,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    port = free_port()
    path = write_config(tmp_path, service("api", SLEEPER_CODE))
    text = path.read_text().replace("127.0.0.1:", "0.0.0.0:")
    path.write_text(text)
    async with running_daemon(path) as daemon, httpx.AsyncClient(timeout=10) as client:
        status = (await client.get(f"http://127.0.0.1:{daemon.listen_address[1]}/v1/status")
                  ).json()
    warnings = status["daemon"]["warnings"]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "web_config_file" in warnings[0]
    assert "WARNING: listen address 0.0.0.0" in render(status)
    assert any(r.levelno == logging.WARNING and "not loopback" in r.getMessage()
               for r in caplog.records)
    done = await anyio.to_thread.run_sync(check_config, path)
    assert done.returncode == 0 and "warning: listen address 0.0.0.0" in done.stderr
    # With TLS and users the same address is protected: no warning.
    caplog.clear()
    path.write_text(text.replace("[supervisor]\n", "[supervisor]\n" + web_config(
        pki, TLS_ONLY, users=True)))
    del port
    async with running_daemon(path) as daemon:
        assert daemon.warnings == ()
    assert not any("not loopback" in r.getMessage() for r in caplog.records)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=60)


def test_check_config_names_the_file_and_key(tmp_path: Path, pki: PKI) -> None:
    web = pki.directory / "web.yml"
    path = write_config(tmp_path, service("api", SLEEPER_CODE), f'web_config_file = "{web}"\n')
    cases = {
        "tls_server_config:\n  cert_file: server.crt\n": "missing one of key or key_file",
        "tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n":
            "tls_server_config.cert_file",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_ca_file: ca.pem\n": "without a Client Auth Policy",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: Sometimes\n": "tls_server_config.client_auth_type",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  min_version: TLS99\n": "tls_server_config.min_version",
        "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n":
            "failed to load the certificate and key",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  ciphers: []\n": "tls_server_config.ciphers: unknown key",
        "basic_auth_users:\n  alice: plaintext-password\n": "basic_auth_users.alice",
        "basic_auth_users:\n  alice: x\n  alice: y\n": "duplicate key",
        "unknown_top: 1\n": "unknown_top: unknown key",
        "tls_server_config: [\n": "YAML syntax error",
        "rate_limit:\n  interval: soon\n": "rate_limit.interval",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  curve_preferences: [X25519, CurveP256]\n": "tls_server_config.curve_preferences",
        "tls_server_config:\n  curve_preferences: [CurveP999]\n": "unknown curve: CurveP999",
        "tls_server_config:\n  min_version: [TLS12]\n": "tls_server_config.min_version",
        "basic_auth_users:\n  ? [a, b]\n  : x\n": "a key must be a scalar",
    }
    for text, expected in cases.items():
        web.write_text(text)
        done = subprocess.run([sys.executable, "-m", "supervisor", "check-config", "--config",
                               str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (text, done.stdout)
        assert str(web) in done.stderr and expected in done.stderr, (text, done.stderr)
        assert "Traceback" not in done.stderr and "plaintext-password" not in done.stderr
    web.write_text(f"tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                   f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"
                   f"  min_version: TLS13\nbasic_auth_users:\n  prometheus: {HASH}\n")
    done = subprocess.run([sys.executable, "-m", "supervisor", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_node_exporter_web_config_loads_unchanged(pki: PKI) -> None:
    """The toolkit's own sample (docs/web-config.yml) plus the keys node_exporter users set."""
    web = pki.directory / "node.yml"
    web.write_text("""\
# Minimal TLS configuration example. Additionally, a certificate and a key file
# are needed.
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: "RequireAndVerifyClientCert"
  client_ca_file: ca.pem
  min_version: TLS12
  max_version: TLS13
  prefer_server_cipher_suites: true
  cipher_suites:
    - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    - TLS_AES_128_GCM_SHA256
http_server_config:
  http2: true
  headers:
    X-Frame-Options: deny
    X-Content-Type-Options: nosniff
# Usernames and passwords required to connect.
# Passwords are hashed with bcrypt: https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md#about-bcrypt
basic_auth_users:
  alice: $2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze
  bob: $2y$10$hLqFl9jSjoAAy95Z/zw8Ye8wkdMBM8c5Bn1ptYqP/AXyV0.oy0S8m
""")
    config = load_web_config(str(web))
    assert config.tls is not None and config.tls.verify_mode == ssl.CERT_REQUIRED
    assert config.tls.minimum_version == ssl.TLSVersion.TLSv1_2
    assert set(config.users) == {"alice", "bob"}
    assert ("X-Frame-Options", "deny") in config.headers
    assert "$2y$" not in repr(config)
    (pki.directory / "empty.yml").write_text("")
    assert load_web_config(str(pki.directory / "empty.yml")).tls is None
    web.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                   "  curve_preferences: [X25519]\n")
    assert load_web_config(str(web)).tls is not None  # one curve: applied as Go would
    with pytest.raises(WebConfigError, match="RequireAnyClientCert"):
        web.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                       "  client_auth_type: RequireAnyClientCert\n")
        load_web_config(str(web))


@pytest.mark.slow
async def test_prometheus_scrapes_over_mtls_with_basic_auth(tmp_path: Path, pki: PKI) -> None:
    tls = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n"
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, tls, users=True))
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    (prom_dir / "password").write_text(PASSWORD)
    async with running_daemon(path) as daemon:
        host, port = daemon.listen_address
        prom_port = free_port()
        (prom_dir / "prometheus.yml").write_text(f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: supervisor
    metrics_path: /v1/metrics
    scheme: https
    tls_config:
      ca_file: {pki.directory / "ca.pem"}
      cert_file: {pki.client}
      key_file: {pki.client}
    basic_auth:
      username: prometheus
      password_file: {prom_dir / "password"}
    static_configs:
      - targets: ['{host}:{port}']
  - job_name: no-password
    metrics_path: /v1/metrics
    scheme: https
    tls_config:
      ca_file: {pki.directory / "ca.pem"}
      cert_file: {pki.client}
      key_file: {pki.client}
    static_configs:
      - targets: ['{host}:{port}']
""")
        log = (prom_dir / "prometheus.log").open("wb")
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for in finally
            [PROMETHEUS, f"--config.file={prom_dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={prom_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                found: dict[str, str] = {}
                with anyio.fail_after(30):
                    while set(found) != {"supervisor", "no-password"} or found.get(
                            "supervisor") != "1":
                        assert proc.poll() is None, (prom_dir / "prometheus.log").read_text()
                        try:
                            response = await client.get(
                                f"http://127.0.0.1:{prom_port}/api/v1/query",
                                params={"query": 'up or service_up{service="api"}'})
                            for r in response.json()["data"]["result"]:
                                job = r["metric"].get("job", "")
                                if r["metric"]["__name__"] == "up":
                                    found[job] = r["value"][1]
                        except (httpx.TransportError, KeyError, ValueError):
                            pass
                        await anyio.sleep(0.3)
                assert found == {"supervisor": "1", "no-password": "0"}
                # Prometheus' own series from the scrape, labelled by the daemon.
                response = await client.get(f"http://127.0.0.1:{prom_port}/api/v1/query",
                                            params={"query": 'service_up{service="api"}'})
                result = response.json()["data"]["result"]
                assert result and result[0]["metric"]["job"] == "supervisor"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


async def test_rotated_certificates_and_edited_users_apply_without_a_reload(
        tmp_path: Path, pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    """As with the toolkit, which reads the file per request: cert-manager style rotation."""
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, TLS_ONLY))
    async with running_daemon(path) as daemon:
        async with httpx.AsyncClient(verify=pki.client_context(), timeout=10) as client:
            assert (await client.get(url(daemon) + "/v1/health")).status_code == 200
        new_ca = trustme.CA()
        rotated = new_ca.issue_cert("127.0.0.1")
        rotated.cert_chain_pems[0].write_to_path(str(pki.directory / "server.crt"))
        rotated.private_key_pem.write_to_path(str(pki.directory / "server.key"))
        new_trust = ssl.create_default_context()
        new_ca.configure_trust(new_trust)
        with anyio.fail_after(10):
            while True:
                try:
                    async with httpx.AsyncClient(verify=new_trust, timeout=5) as client:
                        response = await client.get(url(daemon) + "/v1/health")
                        assert response.status_code == 200
                        break
                except REFUSED:
                    await anyio.sleep(0.2)
        # Users added to the file: required from then on, still without a reload.
        web_config(pki, TLS_ONLY, users=True)
        async with httpx.AsyncClient(verify=new_trust, timeout=5) as client:
            with anyio.fail_after(10):
                while (await client.get(url(daemon) + "/v1/status")).status_code != 401:
                    await anyio.sleep(0.2)
            # A broken edit is logged and ignored: the last good config stays.
            caplog.set_level(logging.ERROR)
            (pki.directory / "web.yml").write_text("tls_server_config: [\n")
            with anyio.fail_after(10):
                while not any("does not load" in r.getMessage() for r in caplog.records):
                    await client.get(url(daemon) + "/v1/health")  # the files are checked then
                    await anyio.sleep(0.2)
            assert (await client.get(url(daemon) + "/v1/status",
                                     headers=basic("prometheus", PASSWORD))).status_code == 200


@pytest.mark.parametrize("auth_type,without,rogue", [
    ("VerifyClientCertIfGiven", True, False),
    ("RequestClientCert", True, True),  # asked for, never verified: access as NoClientCert
])
async def test_optional_client_certificate_policies(tmp_path: Path, pki: PKI, auth_type: str,
                                                    without: bool, rogue: bool) -> None:
    ca_line = "  client_ca_file: ca.pem\n" if auth_type == "VerifyClientCertIfGiven" else ""
    tls = f"  client_auth_type: {auth_type}\n{ca_line}"
    path = write_config(tmp_path, service("api", SLEEPER_CODE), web_config(pki, tls))
    async with running_daemon(path) as daemon:
        for cert, allowed in ((None, without), (pki.client, True), (pki.rogue_client, rogue)):
            async with httpx.AsyncClient(verify=pki.client_context(cert), timeout=10) as client:
                if allowed:
                    assert (await client.get(url(daemon) + "/v1/health")).status_code == 200
                else:
                    with pytest.raises(REFUSED):
                        await client.get(url(daemon) + "/v1/health")


async def test_rate_limit_and_security_headers(tmp_path: Path, pki: PKI) -> None:
    (pki.directory / "web.yml").write_text(
        "rate_limit:\n  interval: 10s\n  burst: 3\n"
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
        "    Content-Security-Policy: default-src 'none'\n")
    path = write_config(tmp_path, service("api", SLEEPER_CODE),
                        f'web_config_file = "{pki.directory / "web.yml"}"\n')
    async with running_daemon(path) as daemon, httpx.AsyncClient(timeout=10) as client:
        answers = [await client.get(url(daemon, "http") + "/v1/health") for _ in range(5)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
        for response in answers:
            assert response.headers["x-frame-options"] == "deny"
            assert response.headers["content-security-policy"] == "default-src 'none'"


def test_inline_pem_encrypted_keys_and_version_order(pki: PKI) -> None:
    from cryptography.hazmat.primitives import serialization

    web = pki.directory / "inline.yml"
    indent = lambda text: "".join(f"    {line}\n" for line in text.splitlines())  # noqa: E731
    cert = (pki.directory / "server.crt").read_text()
    key = (pki.directory / "server.key").read_text()
    ca = (pki.directory / "ca.pem").read_text()
    web.write_text(f"tls_server_config:\n  cert: |\n{indent(cert)}  key: |\n{indent(key)}"
                   f"  client_ca: |\n{indent(ca)}"
                   "  client_auth_type: RequireAndVerifyClientCert\n")
    config = load_web_config(str(web))
    assert config.tls is not None and config.tls.verify_mode == ssl.CERT_REQUIRED
    assert "PRIVATE KEY" not in repr(config)

    private = serialization.load_pem_private_key(key.encode(), None)
    (pki.directory / "encrypted.key").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    web.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: encrypted.key\n")
    with pytest.raises(WebConfigError, match="encrypted"):  # and no prompt on the terminal
        load_web_config(str(web))
    web.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                   "  min_version: TLS13\n  max_version: TLS12\n")
    with pytest.raises(WebConfigError, match="max_version: lower than min_version"):
        load_web_config(str(web))


def test_bcrypt_runs_once_per_credentials_and_unknown_users_cost_the_same(
        pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.web.heads import header
    from supervisor.web.webauth import WebGate

    (pki.directory / "auth.yml").write_text(f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    config = load_web_config(str(pki.directory / "auth.yml"))
    gate = WebGate(lambda: config)
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    good = basic("prometheus", PASSWORD)["Authorization"]
    head = f"GET /v1/health HTTP/1.1\r\nAuthorization: {good}\r\n\r\n".encode()
    assert header(head, b"authorization") == good.encode()
    assert not gate.inline_ok(head)  # not checked yet: bcrypt would run on the acceptor
    assert all(gate.authenticated(config, good) for _ in range(50))
    assert len(calls) == 1
    assert gate.inline_ok(head)  # now cached: the acceptor may answer it
    assert not gate.authenticated(config, basic("prometheus", "wrong")["Authorization"])
    assert not gate.authenticated(config, basic("mallory", PASSWORD)["Authorization"])
    # An unknown user is checked against a fixed hash, so timing does not reveal users.
    assert len(calls) == 3 and calls[2].startswith(b"$2y$10$")


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                     st.text(max_size=20), st.sampled_from(["TLS13", "server.crt", "ca.pem",
                                                            "RequireAndVerifyClientCert", HASH]))
_KEYS = st.sampled_from(["tls_server_config", "http_server_config", "rate_limit",
                         "basic_auth_users", "cert_file", "key_file", "client_auth_type",
                         "client_ca_file", "min_version", "max_version", "cipher_suites",
                         "client_allowed_sans", "headers", "X-Frame-Options", "interval",
                         "burst", "http2", "cert", "key", "client_ca", "nonsense"])
_DOCS = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=5)), max_leaves=12)


@given(document=_DOCS)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_document_is_a_config_or_a_clear_error(pki: PKI, document: object) -> None:
    import yaml

    from supervisor.config.webconfig import parse_web_config

    text = yaml.safe_dump(document)
    try:
        config = parse_web_config(text, str(pki.directory / "web.yml"))
    except WebConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        assert "Traceback" not in str(exc)
    else:
        assert config.path.endswith("web.yml")


def test_special_and_huge_files_are_refused_without_hanging(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.yml"
    big.write_bytes(b"#" * (2 * 1024 * 1024))
    for path, expected in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                           (tmp_path, "Is a directory"), (big, "larger than"),
                           (tmp_path / "missing.yml", "No such file")):
        with pytest.raises(WebConfigError, match=expected):
            load_web_config(str(path))
