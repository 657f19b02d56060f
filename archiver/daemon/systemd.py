"""``desto-archiver systemd-unit``: a hardened Type=notify unit for this installation's paths."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

from archiver.config import Settings

# The account the shipped unit (docker/systemd/desto-archiver.service) runs as.
SYSTEM_USER = "desto"

UNIT_TEMPLATE = """\
# desto-archiver as a systemd service. Install as /etc/systemd/system/desto-archiver.service, then:
#   systemctl daemon-reload && systemctl enable --now desto-archiver
# {user} needs write access to {data_dir} (the database, its -wal/-shm and lock files live there);
# files it creates there are 0660 (UMask=0007): give desto's user the group {group} to share them.

[Unit]
Description=desto-archiver: keeps desto's Redis history in desto's SQLite file
Documentation=file:{docs}
Wants=network-online.target
After=network-online.target redis-server.service redis.service

[Service]
Type=notify
NotifyAccess=main
# READY=1 comes once the archive is open, also while Redis is still down (the daemon then waits
# for it, STATUS= says so): a start only takes longer than this when opening the file does (a
# schema migration of a large archive).
TimeoutStartSec=300
WatchdogSec=30
User={user}
Group={group}
# Defaults, overridden by the environment file.
Environment=DESTO_DATA_DIR={data_dir} SQLITE_DB_PATH={db}
EnvironmentFile=-{env_file}
WorkingDirectory={data_dir}
ExecStart={exec_start} run
# SIGTERM: flush, commit, exit 0 within ARCHIVER_SHUTDOWN_TIMEOUT (10 s by default).
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=5
# The daemon's memory is bounded whatever Redis holds (docs/deployment.md, "Memory"): 56 MB
# with hostile keys, 440 MB under a stream of 16 MB records. Past this, a leak is stopped.
MemoryMax=1G
SyslogIdentifier=desto-archiver

# Hardening: the archiver only talks to Redis and writes the archive's folder; it needs no
# capability and no privileged system call. (`systemd-analyze security desto-archiver` rates it
# about 1.2. Not set: PrivateNetwork, as Redis is reached over the network; IPAddressDeny, as Redis
# may be on another host; PrivateUsers, which systemd in a container may fail to set up together
# with ProtectProc=invisible (status 217/USER), and which weighs the same in the rating.)
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ReadWritePaths={data_dir}
PrivateTmp=yes
ProtectHome={protect_home}
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RemoveIPC=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# CPython (without its experimental JIT) never maps writable and executable memory.
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
# The archive holds command lines: the files the daemon creates are its group's, not the world's
# (0660; desto's user, a member of the group, reads and writes them).
UMask=0007

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
    # this project's README, installed next to the virtual environment (<folder>/.venv/bin/desto-archiver)
    docs = Path(exec_start).parent.parent.parent / "README.md"
    account = user if user is not None else _current_account()
    if not account.strip():
        raise ValueError("--user is empty: name the account the service runs as")
    if account == "root":
        raise ValueError(
            "--user root: the unit runs the archiver as an unprivileged account; name the one that owns "
            f"the archive's folder (the shipped unit's: useradd --system --home-dir /var/lib/desto {SYSTEM_USER})"
        )
    for what, value in (
        ("--user", account),
        ("the archive's path", str(db)),
        ("--env-file", env_file),
        ("the executable's path", str(exec_start)),
    ):
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError(
                f"{what} holds a control character ({value!r}): a newline would add directives of its own to the unit"
            )
    return UNIT_TEMPLATE.format(
        db=db,
        exec_start=exec_start,
        docs=docs,
        env_file=env_file,
        user=account,
        group=account,
        data_dir=db.parent,
        protect_home="read-only" if Path("/home") in db.parents or Path("/root") in db.parents else "yes",
    )


def _current_account() -> str:
    """The account this process runs as, by its user id (sudo and su may leave the caller's name in
    LOGNAME and USER). Root is refused: a unit must name the unprivileged account it runs as."""
    uid = os.geteuid()
    if uid == 0:
        raise ValueError(
            "run as root, it cannot tell which account the service should run as, and never runs it as root: "
            f"name one with --user (the shipped unit's is {SYSTEM_USER}: "
            f"useradd --system --home-dir /var/lib/desto {SYSTEM_USER})"
        )
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ValueError(f"uid {uid} has no account name: name the account with --user") from None
