"""``cycles evidence``: fetch and verify signed evidence, show and rotate the signing keys.

::

    cycles evidence get 5c90a553...                 # the envelope, as the server serves it
    cycles evidence verify 5c90a553...              # fetch it and the JWK Set, verify offline
    cycles evidence verify envelope.json --jwks jwks.json   # fully offline (archived copies)
    cycles evidence keys show                       # kid, public key, validity window
    cycles evidence keys rotate --in 60             # new key from 60 s from now on

``verify`` prints the spec's disposition (``authentic``, ``binding_only``,
``signer_authority_failed``, ``signer_resolution_failed``, ``signature_invalid``) and exits 0
when the envelope is acceptable (``authentic``, or ``binding_only`` without a failed pin), 1
otherwise, 2 for bad input.

The key commands work on the key ring file (``--keys``, ``CYCLES_EVIDENCE_KEYS_FILE``, else
the file beside the default database, as ``cycles serve`` uses it). They never print private
keys. Servers re-read the file within a second of a change; ``rotate`` schedules the switch
``--in`` seconds ahead (60 by default) so every server sharing the file has the new key first.

Imports of the server and of ``cryptography`` are deferred to the commands that need them,
like the rest of the CLI (``cycles --help`` stays fast).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer

from runcycles_server.cli_admin import DEFAULT_URL, CliError, reported

if TYPE_CHECKING:
    from runcycles_server.evidence.issuer import Issuer
    from runcycles_server.evidence.keys import KeyRing

ENV_EVIDENCE: Final = "CYCLES_EVIDENCE"
"""``1``: workers emit evidence (set by ``cycles serve`` unless ``--no-evidence``)."""
ENV_SERVER_ID: Final = "CYCLES_SERVER_ID"
"""The evidence ``server_id``: the public base URL including ``/v1``."""
ENV_EVIDENCE_RETENTION_DAYS: Final = "CYCLES_EVIDENCE_RETENTION_DAYS"
ENV_EVIDENCE_RATE_LIMIT: Final = "CYCLES_EVIDENCE_RATE_LIMIT"
"""Requests a minute per client address on the public evidence routes (0: no limit)."""
DEFAULT_EVIDENCE_RATE_LIMIT: Final = 300  # = evidence.api.PUBLIC_REQUESTS_PER_MINUTE
DEFAULT_EVIDENCE_RETENTION_DAYS: Final = 400  # = evidence.issuer.DEFAULT_RETENTION_DAYS
_EVIDENCE_ID: Final = re.compile(r"^[0-9a-f]{64}$")

evidence_app = typer.Typer(
    help="Signed evidence: fetch and verify envelopes, show and rotate the signing keys.",
    no_args_is_help=True,
)
keys_app = typer.Typer(help="The server's Ed25519 evidence signing keys.", no_args_is_help=True)
evidence_app.add_typer(keys_app, name="keys")

Url = Annotated[
    str, typer.Option("--url", envvar="CYCLES_BASE_URL", help="Server root URL.", show_default=True)
]
KeysFile = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        envvar="CYCLES_EVIDENCE_KEYS_FILE",
        help="Key ring file (default: beside the default database).",
        show_default=False,
    ),
]


def default_keys_path(db: Path) -> Path:
    """The key ring file that goes with a SQLite database (``cycles.db`` → beside it)."""
    return db.with_name(db.stem + ".evidence-keys.json")


def issuer_from_env() -> Issuer | None:
    """The evidence issuer of a worker process, from the environment ``cycles serve`` sets.

    ``None`` unless ``CYCLES_EVIDENCE=1``.
    """
    if os.environ.get(ENV_EVIDENCE) != "1":
        return None
    from runcycles_server.evidence.issuer import Issuer
    from runcycles_server.evidence.keys import KeyRing, KeyRingError

    server_id = os.environ.get(ENV_SERVER_ID) or f"{DEFAULT_URL}/v1"
    days = float(os.environ.get(ENV_EVIDENCE_RETENTION_DAYS) or DEFAULT_EVIDENCE_RETENTION_DAYS)
    try:
        ring = KeyRing.from_environment(None, _now_ms())
        return Issuer(server_id, ring, retention_ms=round(days * 86_400_000))
    except (KeyRingError, ValueError) as exc:
        raise SystemExit(f"evidence: {exc}") from None


def evidence_rate_limit_from_env() -> int | None:
    """The public evidence routes' per-address limit a worker applies (``None``: none)."""
    raw = os.environ.get(ENV_EVIDENCE_RATE_LIMIT)
    limit = DEFAULT_EVIDENCE_RATE_LIMIT if not raw else int(raw)
    return limit or None


def prepare_serve(
    *, keys: Path | None, default: Path, public_url: str, retention_days: int, rate_limit: int
) -> str:
    """Create (or check) the key ring and set the workers' evidence environment; describe it.

    Raises:
        CliError: an unusable key ring, public URL or retention.
    """
    from runcycles_server.evidence.keys import KEYS_ENV, KEYS_FILE_ENV, KeyRing, KeyRingError

    url = public_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CliError(f"--public-url {public_url!r} must be an http(s) URL", 2)
    if retention_days < 1:
        raise CliError("--evidence-retention-days must be at least 1", 2)
    try:
        if os.environ.get(KEYS_ENV):
            ring = KeyRing.from_environment(None, _now_ms())
            source = f"${KEYS_ENV}"
        else:
            path = keys or default
            ring = KeyRing.load_or_create(path, _now_ms())
            os.environ[KEYS_FILE_ENV] = str(path.resolve())
            source = str(path)
    except KeyRingError as exc:
        raise CliError(str(exc)) from None
    os.environ[ENV_EVIDENCE] = "1"
    os.environ[ENV_SERVER_ID] = f"{url}/v1"
    os.environ[ENV_EVIDENCE_RETENTION_DAYS] = str(retention_days)
    os.environ[ENV_EVIDENCE_RATE_LIMIT] = str(rate_limit)
    active = ring.signer_at(_now_ms())
    return f"evidence: on (server_id {url}/v1, key {active.kid} from {source})"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _keys_path(keys: Path | None) -> Path:
    if keys is not None:
        return keys
    from platformdirs import user_data_dir  # deferred like the server imports: startup time

    return default_keys_path(Path(user_data_dir("runcycles", appauthor=False)) / "cycles.db")


def _ring(keys: Path | None) -> KeyRing:
    from runcycles_server.evidence.keys import KeyRing, KeyRingError

    path = _keys_path(keys)
    if not path.exists():
        raise CliError(
            f"no evidence key file at {path}; `cycles serve` creates it on first start, or pass "
            "--keys PATH",
            2,
        )
    try:
        return KeyRing.load(path)
    except KeyRingError as exc:
        raise CliError(str(exc), 2) from None


@keys_app.command("show")
def keys_show(
    keys: KeysFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the public JWK Set.")] = False,
) -> None:
    """Show the signing keys (public halves only) and their validity windows."""
    with reported():
        ring = _ring(keys)
        now = _now_ms()
        if as_json:
            typer.echo(json.dumps(ring.jwks(now), indent=2))
            return
        for key in ring.keys:
            state = "active" if key.covers(now) else ("next" if key.nbf_ms > now else "retired")
            typer.echo(f"{key.kid}  {state:7}  {key.public_hex}  window {key.window}")


@keys_app.command("rotate")
def keys_rotate(
    keys: KeysFile = None,
    in_seconds: Annotated[
        int,
        typer.Option(
            "--in",
            min=0,
            help="Seconds from now the new key takes over (servers re-read the file within 1 s).",
        ),
    ] = 60,
) -> None:
    """Schedule a new signing key; the old one stays in the JWK Set for its window."""
    with reported():
        from runcycles_server.evidence.keys import KeyRingError

        ring = _ring(keys)
        switch = _now_ms() + max(in_seconds * 1000, 1)
        try:
            fresh = ring.rotate(switch)
            ring.save()
        except KeyRingError as exc:
            raise CliError(str(exc), 2) from None
        typer.echo(f"new key {fresh.kid} ({fresh.public_hex}) signs from {switch} (epoch ms) on")


def _get(url: str, *, what: str) -> bytes:
    import httpx

    try:
        response = httpx.get(url, timeout=10.0)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot fetch {what} from {url} ({type(exc).__name__}: {exc})") from None
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text.strip()[:200]
        raise CliError(f"{what}: {response.status_code} from {url}: {message}")
    return response.content


def _check_id(evidence_id: str) -> str:
    if not _EVIDENCE_ID.match(evidence_id):
        raise CliError(
            f"{evidence_id!r} is not an evidence id (64 lower-case hex digits) nor a file", 2
        )
    return evidence_id


@evidence_app.command("get")
def get(
    evidence_id: Annotated[str, typer.Argument(help="The evidence id.")], url: Url = DEFAULT_URL
) -> None:
    """Print a signed envelope as the server serves it (canonical JSON)."""
    with reported():
        raw = _get(f"{url.rstrip('/')}/v1/evidence/{_check_id(evidence_id)}", what="evidence")
        typer.echo(raw.decode())


@evidence_app.command("verify")
def verify(
    target: Annotated[str, typer.Argument(help="An envelope file, or an evidence id to fetch.")],
    url: Url = DEFAULT_URL,
    jwks: Annotated[
        str | None,
        typer.Option(
            help="JWK Set file or URL (default: fetched from the envelope's server_id).",
            show_default=False,
        ),
    ] = None,
    expected_signer: Annotated[
        str | None,
        typer.Option(help="Pinned raw-hex public key of the signer.", show_default=False),
    ] = None,
    offline: Annotated[
        bool, typer.Option(help="Consult no JWK Set: check id and signature only.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Verify an envelope offline: id, signature and (with the JWK Set) signer authority."""
    with reported():
        from runcycles.evidence import jwks_url, verify_envelope

        path = Path(target)
        if path.is_file():
            raw = path.read_bytes()
        else:
            raw = _get(f"{url.rstrip('/')}/v1/evidence/{_check_id(target)}", what="evidence")
        key_set: Any = None
        if jwks is not None and not offline:
            if jwks.startswith(("http://", "https://")):
                key_set = _fetch_jwks(jwks)
            else:
                try:
                    key_set = Path(jwks).read_bytes()
                except OSError as exc:
                    raise CliError(f"cannot read --jwks {jwks}: {exc.strerror}", 2) from None
        elif not offline:
            try:
                server_id = json.loads(raw).get("server_id")
            except (ValueError, AttributeError):
                server_id = None
            if isinstance(server_id, str):
                key_set = _fetch_jwks(jwks_url(server_id))
        result = verify_envelope(raw, jwks=key_set, expected_signer=expected_signer)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "disposition": result.disposition.value,
                        "reason": result.reason,
                        "evidence_id": result.evidence_id,
                        "kid": result.kid,
                        "signer_pin_matched": result.signer_pin_matched,
                    }
                )
            )
        else:
            typer.echo(f"{result.disposition.value}: {result.reason}")
        if not result.ok:
            raise typer.Exit(1)


def _fetch_jwks(url: str) -> Any:
    from runcycles.evidence import ResolutionFailure

    try:
        return _get(url, what="JWK Set")
    except CliError as exc:
        return ResolutionFailure(exc.message)


def register_evidence(cli: typer.Typer) -> None:
    """Add the ``evidence`` command group to the ``cycles`` app."""
    cli.add_typer(evidence_app, name="evidence")
