"""``fedretrain keys ...`` and ``fedretrain registry ...``: parse, call the registry, print.

The registry modules are imported inside the handlers, so that commands that do
not need torch (``fedretrain data validate``) do not load it.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import Any

DEFAULT_ROOT = Path("registry")
_ROW = "{mark} {version:>7}  {status:<11}  {created:<20}  {expires:<20}  {parent:>6}  {run:<20}  {gate}"


def add_keys_commands(subparsers: Any) -> None:
    """Add ``keys coordinator|ca|superlink|site`` to the top-level subparsers."""
    keys = subparsers.add_parser("keys", help="signing, TLS and node keys").add_subparsers(
        dest="keys_command", required=True
    )
    coordinator = keys.add_parser("coordinator", help="create the coordinator's Ed25519 signing key pair")
    coordinator.add_argument("--out", type=Path, default=Path("keys"), help="directory for the key files")
    coordinator.add_argument(
        "--force",
        action="store_true",
        help="replace an existing pair (sites that pinned the old public key then refuse new versions)",
    )
    coordinator.set_defaults(func=_keys_coordinator)
    _add_deploy_keys_commands(keys)


def _add_deploy_keys_commands(keys: Any) -> None:
    # The identities of Flower's deployment engine: TLS for the SuperLink, node keys for sites.
    ca = keys.add_parser("ca", help="create the federation's CA (signs the SuperLink's TLS certificate)")
    ca.add_argument("--out", type=Path, default=Path("keys"), help="directory for ca.key and ca.pem")
    ca.add_argument("--name", default="fedretrain federation CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=1825, help="validity in days (default: 1825)")
    ca.add_argument(
        "--force", action="store_true", help="replace an existing CA (every site then needs the new ca.pem)"
    )
    ca.set_defaults(func=_keys_ca)
    link = keys.add_parser("superlink", help="issue the SuperLink's TLS key and certificate from the CA")
    link.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="a DNS name or IP address sites connect to (repeat for each)",
    )
    link.add_argument("--ca-dir", type=Path, default=Path("keys"), help="directory holding ca.pem and ca.key")
    link.add_argument("--out", type=Path, default=Path("keys"), help="directory for superlink.key/.pem")
    link.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    link.add_argument("--force", action="store_true", help="replace an existing key and certificate")
    link.set_defaults(func=_keys_superlink)
    site = keys.add_parser("site", help="create a site's SuperNode authentication key pair (EC P-384)")
    site.add_argument("site_id", metavar="SITE_ID", help="the site's id (names SITE_ID.key and SITE_ID.pub)")
    site.add_argument("--out", type=Path, default=Path("keys"), help="directory for the key files")
    site.add_argument(
        "--force",
        action="store_true",
        help="replace an existing pair (the coordinator must register the new public key)",
    )
    site.set_defaults(func=_keys_site)


def add_registry_commands(subparsers: Any) -> None:
    """Add ``registry list|show|verify|rollback|approve`` to the top-level subparsers."""
    registry = subparsers.add_parser("registry", help="the coordinator's signed model registry")
    commands = registry.add_subparsers(dest="registry_command", required=True)

    def command(name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="registry directory")
        parser.set_defaults(func=handler)
        return parser

    command("list", "list versions, their status, and the champion (*)", _list)
    command("show", "print a version's manifest and status", _show).add_argument("version", type=int)
    verify = command(
        "verify", "verify one version, or the whole registry and its champion chain (exit 1 on a problem)", _verify
    )
    verify.add_argument("version", type=int, nargs="?")
    verify.add_argument(
        "--pubkey",
        type=Path,
        default=None,
        help="the coordinator's public key (PEM) from outside the registry folder; without it "
        "only the key stored in registry.json is used, which proves nothing about who wrote it",
    )
    rollback = command("rollback", "make an older version champion again, with a signed record", _rollback)
    rollback.add_argument("version", type=int)
    rollback.add_argument("--key", type=Path, required=True, help="the coordinator's private key (PEM)")
    rollback.add_argument("--reason", default="rolled back by an operator", help="why (kept in the signed record)")
    approve = command("approve", "approve a pending version and make it champion", _approve)
    approve.add_argument("version", type=int)
    approve.add_argument("--key", type=Path, required=True, help="the coordinator's private key (PEM)")
    approve.add_argument("--approver", default=None, help="who approves (default: the login name)")


def _keys_coordinator(args: argparse.Namespace) -> int:
    from fedretrain.registry.signing import generate_keypair

    pair = generate_keypair(args.out, force=args.force)
    print(f"private key: {pair.private_path}  (keep it on the coordinator)")
    print(f"public key:  {pair.public_path}  (give it to every site)")
    print(f"key id:      {pair.key_id}")
    return 0


def _keys_ca(args: argparse.Namespace) -> int:
    from fedretrain.deploy.pki import create_ca

    ca = create_ca(args.out, name=args.name, days=args.days, force=args.force)
    print(f"CA key:         {ca.key_path}  (keep it on the coordinator, offline if you can)")
    print(f"CA certificate: {ca.cert_path}  (give it to every site: flower-supernode --root-certificates)")
    print(f"fingerprint:    SHA256 {ca.fingerprint}  (sites compare it before trusting the file)")
    print(f"valid until:    {ca.not_after:%Y-%m-%d}")
    return 0


def _keys_superlink(args: argparse.Namespace) -> int:
    from fedretrain.deploy.pki import issue_superlink_cert

    files = issue_superlink_cert(args.ca_dir, args.out, args.host, days=args.days, force=args.force)
    ca_pem = args.ca_dir / "ca.pem"
    print(f"SuperLink key:         {files.key_path}  (stays on the SuperLink host)")
    print(
        f"SuperLink certificate: {files.cert_path}  (for {', '.join(files.hosts)}; "
        f"valid until {files.not_after:%Y-%m-%d})"
    )
    print(
        f"start the SuperLink:   flower-superlink --ssl-ca-certfile {ca_pem} --ssl-certfile {files.cert_path} "
        f"--ssl-keyfile {files.key_path} --enable-supernode-auth --database state.db"
    )
    print(f"sites connect with:    --superlink {files.hosts[0]}:PORT --root-certificates ca.pem")
    return 0


def _keys_site(args: argparse.Namespace) -> int:
    from fedretrain.deploy.pki import create_site_keypair

    pair = create_site_keypair(args.out, args.site_id, force=args.force)
    print(
        f"site key:    {pair.private_path}  (stays at the site: flower-supernode "
        f"--auth-supernode-private-key {pair.private_path})"
    )
    print(
        f"public key:  {pair.public_path}  (register it at the coordinator: "
        f"flwr supernode register {pair.public_path.name})"
    )
    print(f"fingerprint: {pair.fingerprint}  (the coordinator compares it: ssh-keygen -lf {pair.public_path.name})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from fedretrain.registry.store import Registry

    registry = Registry(args.root)
    versions = registry.versions()
    if not versions:
        print(f"no versions in {args.root}")
        return 0
    champion = registry.champion()
    print(
        _ROW.format(
            mark=" ",
            version="VERSION",
            status="STATUS",
            created="CREATED",
            expires="EXPIRES",
            parent="PARENT",
            run="RUN",
            gate="GATE",
        )
    )
    for version in versions:
        print(
            _ROW.format(
                mark="*" if version == champion else " ",
                version=version,
                status=registry.status(version),
                **_manifest_columns(registry, version),
            )
        )
    return 0


def _manifest_columns(registry: Any, version: int) -> dict[str, Any]:
    try:
        manifest = registry.manifest(version)
        run, gate = dict(manifest.get("run") or {}), dict(manifest.get("gate") or {})
        parent = manifest.get("parent")
        return {
            "created": manifest.get("created_at", "?"),
            "expires": manifest.get("expires_at", "?"),
            "parent": "-" if parent is None else parent,
            "run": str(run.get("name") or run.get("run_id") or "-")[:20],
            "gate": gate.get("decision", "-"),
        }
    except (ValueError, TypeError, RuntimeError) as err:  # an unreadable manifest; `verify` says more
        return {"created": "?", "expires": "?", "parent": "?", "run": "?", "gate": f"unreadable: {err}"}


def _show(args: argparse.Namespace) -> int:
    from fedretrain.registry.store import Registry

    registry = Registry(args.root)
    print(json.dumps(registry.manifest(args.version), indent=2, sort_keys=True))
    print(f"status: {registry.status(args.version)}")
    student = registry.student(args.version)
    if student is not None:  # unverified here, as the manifest above; `registry verify` checks both
        from fedretrain.registry.student import student_record

        print(f"student (students/{args.version:06d}/): " + json.dumps(student_record(student), sort_keys=True))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from fedretrain.registry.audit import pin_problems
    from fedretrain.registry.signing import key_id, load_public_key
    from fedretrain.registry.store import Registry

    registry = Registry(args.root)
    key = None if args.pubkey is None else load_public_key(args.pubkey)
    if args.version is None:
        report = registry.check(key)
        problems = list(report.problems)
    else:
        report = registry.inspect(args.version, key)
        problems = pin_problems(registry, key) + list(report.problems)
    for problem in problems:
        print(f"PROBLEM {problem}")
    for note in report.notes:
        print(f"note: {note}")
    what = "registry" if args.version is None else f"version {args.version}"
    if problems:
        print(f"{what} in {args.root}: {len(problems)} problem(s)")
        return 1
    if key is None:
        print(
            f"OK {what} in {args.root} is consistent with the key stored in {args.root}/registry.json. "
            "NOT AUTHENTICATED: whoever can edit the folder can re-sign it and swap that key; "
            "pass --pubkey FILE with the coordinator's public key kept elsewhere"
        )
        return 0
    print(f"OK {what} in {args.root} verifies with key {key_id(key)} from {args.pubkey}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from fedretrain.registry.signing import load_private_key
    from fedretrain.registry.store import Registry

    record = Registry(args.root).rollback(args.version, signing_key=load_private_key(args.key), reason=args.reason)
    body = record.record
    print(
        f"champion is now version {body['target_version']} (was {body['from_version']}; "
        f"signed rollback record {body['sequence']})"
    )
    return 0


def _approve(args: argparse.Namespace) -> int:
    from fedretrain.registry.signing import load_private_key
    from fedretrain.registry.store import Registry

    approver = args.approver or login_name()
    Registry(args.root).approve(args.version, signing_key=load_private_key(args.key), approver=approver)
    print(f"version {args.version} approved by {approver}; it is now champion")
    return 0


def login_name() -> str:
    try:
        return getpass.getuser()
    except OSError:  # no login name in some containers
        return "unknown"
