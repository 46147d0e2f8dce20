"""`rtunnel_server fleet-init` and `rtunnel_server fleet-add-member NAME`:
plain commands (not twistd) that make the fleet CA in the state directory
and issue member certificates from it (rtunnel.fleet.ca)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rtunnel.errors import RtunnelError
from rtunnel.fleet import ca
from rtunnel.tap.server_options import DEFAULT_STATE_DIR


def _state_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-s", "--state-dir", default=DEFAULT_STATE_DIR, help="the state directory that holds (or will hold) the fleet CA",
    )


def fleet_init_main(argv: list[str], out: Any = None) -> int:
    """`rtunnel_server fleet-init [-s DIR] [--fleet NAME]`: make the fleet
    CA unless there is one (an existing CA is kept). Returns the exit status."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="rtunnel_server fleet-init",
        description=(
            "Create the fleet CA (fleet-ca.crt, and fleet-ca.key mode 0600) in the state directory, "
            "once, on one machine; then issue each member's certificate with fleet-add-member."
        ),
    )
    _state_dir_argument(parser)
    parser.add_argument("--fleet", default="fleet", help="a name for the fleet, shown in the CA's subject")
    args = parser.parse_args(argv)
    state_dir = Path(os.path.expanduser(args.state_dir))
    try:
        cert, created = ca.init_ca(state_dir, args.fleet)
    except RtunnelError as e:
        print(f"rtunnel_server fleet-init: {e}", file=sys.stderr)
        return 1
    if created:
        print(
            f"Fleet CA created: {cert} (its key {state_dir / ca.CA_KEY}, mode 600, never leaves this machine).\n"
            f"Issue each member's certificate here:\n    rtunnel_server fleet-add-member m1 -s {state_dir} --out DIR",
            file=out,
        )
    else:
        print(f"A fleet CA is already in {state_dir} ({cert}); kept as it is.", file=out)
    return 0


def fleet_add_member_main(argv: list[str], out: Any = None) -> int:
    """`rtunnel_server fleet-add-member NAME [--out DIR] [-s DIR]`: a key and
    certificate for member NAME, signed by the fleet CA. Returns the exit status."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="rtunnel_server fleet-add-member",
        description=(
            "Issue member NAME's certificate and key from the fleet CA of the state directory: "
            "NAME.crt, NAME.key (mode 0600) and a copy of fleet-ca.crt, in --out (default: the state "
            "directory). Copy the three files to the member and start it with --fleet-member NAME "
            "--fleet-cert, --fleet-key and --fleet-ca (or put them in its state directory)."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="the member's name (its --fleet-member), e.g. m1")
    parser.add_argument("--out", metavar="DIR", help="where to write the files (default: the state directory)")
    _state_dir_argument(parser)
    args = parser.parse_args(argv)
    state_dir = Path(os.path.expanduser(args.state_dir))
    out_dir = Path(os.path.expanduser(args.out)) if args.out else None
    try:
        files = ca.issue_member(state_dir, args.name, out_dir)
    except RtunnelError as e:
        print(f"rtunnel_server fleet-add-member: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"rtunnel_server fleet-add-member: cannot write to {out_dir or state_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(
        f"Member {args.name!r}: certificate {files.cert}, key {files.key} (mode 600), fleet CA {files.ca}.\n"
        f"Start the member with:\n    rtunnel_server --fleet-member {args.name} --fleet-cert {files.cert} "
        f"--fleet-key {files.key} --fleet-ca {files.ca} --fleet-listen ENDPOINT …",
        file=out,
    )
    return 0


#: `rtunnel_server WORD …` commands that are not the server itself
COMMANDS = {"fleet-init": fleet_init_main, "fleet-add-member": fleet_add_member_main}
