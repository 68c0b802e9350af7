"""`stallscope keys`: CURVE keypairs for the collector and the tracers, and the
collector's allow-list of tracer keys (ZeroMQ certificate files, see wire/auth.py)."""

from __future__ import annotations

import json
import sys

import click

from stallscope.wire import auth

KEYS_EPILOG = """\b
The whole flow (one collector, any number of tracers):
  # on the collector: its keypair and an empty allow-list
  stallscope keys create collector --dir /etc/stallscope/keys
  mkdir -p /etc/stallscope/keys/allowed
  # on each tracer node: its own keypair, plus a copy of the collector's PUBLIC key
  stallscope keys create tracer --dir /etc/stallscope/keys
  scp collector:/etc/stallscope/keys/collector.key /etc/stallscope/keys/
  # back on the collector: fetch that node's PUBLIC key and allow it
  scp node7:/etc/stallscope/keys/tracer.key node7.key
  stallscope keys allow node7.key --dir /etc/stallscope/keys/allowed
  stallscope collect --bind tcp://0.0.0.0:5557 --keys-dir /etc/stallscope/keys
  # on the node
  sudo stallscope trace --collector tcp://collector:5557 --keys-dir /etc/stallscope/keys \\
       --collector-key collector.key
\b
Secret keys (*.key_secret, mode 0600) never leave their host; only *.key files are copied.
"""


@click.group("keys", epilog=KEYS_EPILOG)
def keys():
    """Create CURVE keys and manage the collector's allow-list, for encrypted and
    authenticated streams between tracers and collectors."""


CREATE_EPILOG = """\b
Examples:
  stallscope keys create collector --dir /etc/stallscope/keys   # on the collector
  stallscope keys create tracer --dir /etc/stallscope/keys      # on each node
  stallscope keys create node7 --dir ./keys --json
"""


@keys.command("create", epilog=CREATE_EPILOG)
@click.argument("name")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="Where to write NAME.key and NAME.key_secret (created 0700 if missing).")
@click.option("--json", "as_json", is_flag=True, help="Print the paths and public key as JSON.")
def create(name, directory, as_json):
    """Write a new keypair: NAME.key (public, share it) and NAME.key_secret (secret, mode
    0600, never copy it). Refuses to replace an existing key."""
    try:
        public_path, secret_path = auth.create_keypair(directory, name)
        public_key = auth.load_public_key(public_path).decode()
    except (auth.SecurityError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        sys.stdout.write(json.dumps({"name": name, "public_key": public_key, "public_file": public_path,
                                     "secret_file": secret_path}) + "\n")
    else:
        click.echo(f"{public_path}  (public: copy it to the peers)\n{secret_path}  (secret, 0600: keep it here)\n"
                   f"public key {public_key}")


ALLOW_EPILOG = """\b
Examples:
  stallscope keys allow node7.key --dir /etc/stallscope/keys/allowed
  stallscope keys allow /tmp/tracer.key --name node8 --dir /etc/stallscope/keys/allowed
  rm /etc/stallscope/keys/allowed/node8.key       # revoke: new connections are refused
\b
A running collector re-reads the folder at the next handshake: no restart needed.
"""


@keys.command("allow", epilog=ALLOW_EPILOG)
@click.argument("public_key_file", type=click.Path(dir_okay=False))
@click.option("--dir", "allow_dir", required=True, type=click.Path(file_okay=False),
              help="The collector's allow-list folder (--keys-dir/allowed, or collect's --allow-dir).")
@click.option("--name", default=None, help="Store it as NAME.key [default: the file's own name].")
def allow(public_key_file, allow_dir, name):
    """Let a tracer's public key connect to the collector: copy it into the allow-list."""
    try:
        dest, added = auth.allow_key(public_key_file, allow_dir, name)
        key = auth.load_public_key(dest).decode()
    except (auth.SecurityError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{'allowed' if added else 'already allowed'}: {key} as {dest}")


LIST_EPILOG = """\b
Examples:
  stallscope keys list --dir /etc/stallscope/keys
  stallscope keys list --dir /etc/stallscope/keys/allowed --json | jq -r .public_key
"""


@keys.command("list", epilog=LIST_EPILOG)
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False),
              help="A key folder or an allow-list folder.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key per line.")
def list_(directory, as_json):
    """The keys in a folder: name, Z85 public key, and whether its secret is there.
    Exits 1 when a file cannot be read (it is listed with the reason)."""
    try:
        infos = auth.list_keys(directory)
    except auth.SecurityError as e:
        raise click.ClickException(str(e)) from None
    for k in infos:
        if as_json:
            sys.stdout.write(json.dumps(k.to_json()) + "\n")
        else:
            what = k.error or ("keypair" if k.secret_file else "public")
            click.echo(f"{k.name:<20} {k.public_key or '-':<40}  {what}")
    if not infos and not as_json:
        click.echo(f"no keys in {directory}", err=True)
    if any(k.error for k in infos):
        sys.exit(1)
