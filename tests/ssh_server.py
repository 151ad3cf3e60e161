"""A throwaway OpenSSH server (Debian's `openssh-server`) on a loopback port, for a DVC remote over SSH:
its own sshd_config, host key, client key and authorized_keys in a temporary directory; key login only, as the
user running the tests; the system's SSH configuration is neither read nor changed.

Without `sshd` or `ssh-keygen`, or without DVC's SSH support (`dvc-ssh`), the tests that need them skip, saying
so; under CI (CI=true) they fail instead: .ci/run installs the package and the project's [team] extra.
"""

from __future__ import annotations

import getpass
import importlib.util
import os
import shutil
import socket
import subprocess
from pathlib import Path

from harness import dvc, free_port, skip_outside_ci, stop_process_group, wait_until

PRIVILEGE_SEPARATION = Path("/run/sshd")  # sshd started as root refuses to run without it; its service makes it


def programs() -> tuple[str, str]:
    """(sshd, ssh-keygen), absolute paths (sshd re-executes itself by its path), or skip/fail saying why."""
    if importlib.util.find_spec("dvc_ssh") is None:
        skip_outside_ci("DVC's SSH support is not installed: `pip install -e \".[team]\"` (dvc-ssh)")
    sshd = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/sbin")  # off a user's PATH on Debian
    keygen = shutil.which("ssh-keygen")
    if not sshd or not keygen:
        skip_outside_ci("OpenSSH's server (sshd) is not installed: `apt-get install openssh-server` "
                        "(Debian/Ubuntu) runs the DVC-over-SSH tests")
    return sshd, keygen


class SshServer:
    """sshd on 127.0.0.1:<port>, started in the foreground (`-D -e`) in its own process group; `start()` and
    `stop()` may be called again (a remote going away and coming back)."""

    def __init__(self, directory: Path):
        self.sshd, keygen = programs()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key, self.client_key = directory / "host_ed25519", directory / "client_ed25519"
        for key in (self.host_key, self.client_key):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "llmpipe-test", "-f", str(key)],
                           check=True, capture_output=True, timeout=60)
        shutil.copy(directory / "client_ed25519.pub", directory / "authorized_keys")
        self.config = directory / "sshd_config"
        self.config.write_text("\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AllowUsers {self.user}",
            "AuthenticationMethods publickey",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",  # CI containers run the tests as root
            "UsePAM no",
            "StrictModes no",  # the temporary directory's modes are pytest's
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
        ]) + "\n")
        self.log = directory / "sshd.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ssh://127.0.0.1:{self.port}"

    def start(self) -> None:
        if os.geteuid() == 0:
            PRIVILEGE_SEPARATION.mkdir(mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"sshd exited {self.process.returncode}:\n{self.log.read_text()[-2000:]}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True

        wait_until(listening, 30, "sshd listened")

    def stop(self) -> None:
        """SIGTERM to sshd and every session it started: the port is closed afterwards."""
        if self.process is not None and self.process.poll() is None:
            stop_process_group(self.process, timeout=10)

    def use_as_remote(self, repo: Path, name: str, path: Path, default: bool = True) -> None:
        """`dvc remote add` of ssh://127.0.0.1:<port><path> in `repo` (committable: no credentials), and the user
        and key file as `dvc remote modify --local` (.dvc/config.local, which git ignores)."""
        dvc(repo, "remote", "add", *(["-d"] if default else []), name, f"{self.url}{path}")
        self.give_credentials(repo, name)

    def give_credentials(self, repo: Path, name: str) -> None:
        """What each teammate sets in their own clone, never committed."""
        dvc(repo, "remote", "modify", "--local", name, "user", self.user)
        dvc(repo, "remote", "modify", "--local", name, "keyfile", str(self.client_key))
