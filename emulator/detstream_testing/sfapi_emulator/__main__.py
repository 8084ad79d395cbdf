"""``python -m detstream_testing.sfapi_emulator --port P (--new-client KEY_FILE | --client-id ID --public-key FILE)``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from . import API_PREFIX, TOKEN_PATH, EmulatorState, create_app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detstream_testing.sfapi_emulator",
                                     description="Superfacility API emulator on loopback (offline runs).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--client-id", help="the SFAPI client id to accept")
    parser.add_argument("--public-key", type=Path, help="PEM public key of that client")
    parser.add_argument("--new-client", type=Path, metavar="KEY_FILE",
                        help="make a client: write its key file (mode 600) here, accept it")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where job scripts and outputs go (default: a new temp dir)")
    parser.add_argument("--token-lifetime", type=float, default=600.0, help="access token lifetime, s")
    parser.add_argument("--kill-grace", type=float, default=2.0, help="SIGTERM->SIGKILL grace, s")
    parser.add_argument("--no-perlmutter-checks", action="store_true",
                        help="accept scripts without -C cpu|gpu and with unknown QOS")
    parser.add_argument("--slurm-conf", type=Path, default=None,
                        help="run jobs on the real Slurm cluster of this slurm.conf (sbatch/scancel)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.new_client:
        from . import generate_client_credentials

        creds = generate_client_credentials()
        creds.write_key_file(args.new_client)
        args.client_id, public_pem = creds.client_id, creds.public_key_pem
        print(f"new client {creds.client_id}: key file {args.new_client}", flush=True)
    elif args.client_id and args.public_key:
        public_pem = args.public_key.read_text()
    else:
        parser.error("give --client-id and --public-key, or --new-client KEY_FILE")

    slurm = None
    if args.slurm_conf:
        from .slurm import SlurmSettings

        slurm = SlurmSettings(slurm_conf=str(args.slurm_conf))
    state = EmulatorState(args.workdir, token_lifetime=args.token_lifetime, kill_grace=args.kill_grace,
                          check_perlmutter_options=not args.no_perlmutter_checks, slurm=slurm)
    state.register_client(args.client_id, public_pem)
    app = create_app(state)
    base = f"http://{args.host}:{args.port}"
    app.state.token_url = base + TOKEN_PATH
    print(f"SFAPI emulator: api_base_url={base}{API_PREFIX} token_url={base}{TOKEN_PATH} "
          f"workdir={state.workdir}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        state.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
