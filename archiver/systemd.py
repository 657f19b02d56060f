"""``desto-archiver systemd-unit``: a hardened Type=notify unit for this installation's paths."""

from __future__ import annotations

import getpass
import shutil
from pathlib import Path

from archiver.config import Settings

UNIT_TEMPLATE = """\
[Unit]
Description=desto-archiver: keeps desto's Redis history in {db}
Documentation=https://pypi.org/project/desto/
After=network-online.target redis-server.service
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} run
EnvironmentFile=-{env_file}
Environment=SQLITE_DB_PATH={db}
User={user}
Group={group}
Restart=on-failure
RestartSec=5
WatchdogSec=30
TimeoutStopSec=30
KillSignal=SIGTERM

# Hardening: the archive's folder is the only place it may write.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data_dir}
PrivateTmp=yes
PrivateDevices=yes
ProtectHome={protect_home}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""


def render_unit(
    settings: Settings,
    executable: Path | None = None,
    user: str | None = None,
    env_file: str = "/etc/desto-archiver/desto-archiver.env",
) -> str:
    """The unit for this installation: ExecStart is this desto-archiver, the archive's folder the
    only writable path (under /home, ProtectHome becomes read-only instead of hiding it)."""
    found = shutil.which("desto-archiver")
    exec_start = executable or (Path(found).resolve() if found else Path("/usr/local/bin/desto-archiver"))
    db = settings.db_path.resolve()
    account = user or getpass.getuser()
    return UNIT_TEMPLATE.format(
        db=db,
        exec_start=exec_start,
        env_file=env_file,
        user=account,
        group=account,
        data_dir=db.parent,
        protect_home="read-only" if Path("/home") in db.parents or Path("/root") in db.parents else "yes",
    )
