"""Starting a hospital's node in a real federation (``privatune node``).

Before anything connects, the node proves its set-up locally: the site policy is valid, the
data loads and splits, delta is small enough for the number of privacy units, the base model
and the authentication key are readable. It then states, in plain words, exactly what will
leave the site, and only then starts Flower's SuperNode with the site's root certificate,
its private authentication key and ``--node-config site-policy=<policy file>`` (read by
``client.app``).

Flower 1.42 facts this relies on: a SuperNode with ``--auth-supernode-private-key`` must use
TLS (``--root-certificates``) and is refused unless the coordinator registered its public
key; the SuperNode serves a local Runtime API on ``--port`` (default 9094, 127.0.0.1 only)
and starts ``flower-superexec``/``flwr-clientapp`` by name from ``PATH``; the ClientApp code
that runs is the one in the run's FAB, installed under ``$FLWR_HOME/apps``.
"""

from __future__ import annotations

import errno
import json
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from privatune.client.node import SiteNode
from privatune.client.policy import SitePolicy, load_site_policy
from privatune.common.flower_process import flower_env, flower_tool
from privatune.common.certs import CertError, check_certificate, check_node_private_key
from privatune.common.config import ConfigError, read_yaml

Progress = Callable[[str], None]


def say(text: str) -> None:
    """Print at once: the statement must precede the SuperNode's own log, even in a pipe."""
    print(text, flush=True)

REFUSED_HELP = ("If the SuperNode's log above says 'Failed to activate SuperNode' (Flower exit "
                "code 305), the coordinator has not registered this site's public key; "
                "'CERTIFICATE_VERIFY_FAILED' means --root-cert is not the federation's ca.pem or "
                "the --superlink host is not a name in the SuperLink's certificate.")


@dataclass(frozen=True)
class NodeConnection:
    """How this node reaches the coordinator (given on the command line, not in the policy,
    which describes only the site's own data and limits)."""

    superlink: str  # host:port of the coordinator's SuperLink
    root_cert: Path  # the federation CA (ca.pem) from the coordinator
    auth_key: Path  # this hospital's private key (<name>.key); never leaves the site
    runtime_port: int = 9094  # local-only port of the SuperNode's Runtime API
    max_wait_s: float | None = None  # stop retrying a lost connection after this long


@dataclass(frozen=True)
class CheckedSite:
    policy_path: Path
    policy: SitePolicy
    train_units: int
    heldout_units: int
    duplicates: int
    epsilon_spent: float
    set_aside: str = ""


def check_site(policy_path: Path) -> CheckedSite:
    """Validate policy, state directory, data, delta and base model exactly as the ClientApp
    will use them."""
    try:
        policy_path = policy_path.resolve()
    except (OSError, RuntimeError) as err:  # Python 3.11 says RuntimeError for a link loop
        loop = isinstance(err, RuntimeError) or err.errno == errno.ELOOP
        reason = "a symbolic link loop (ELOOP)" if loop else (err.strerror or str(err))
        raise ConfigError(f"{policy_path}: cannot read the site policy ({reason}); point --site "
                          "at the real file") from err
    policy = load_site_policy(policy_path)
    check_state_dir(policy, policy_path)
    node = SiteNode(policy)  # loads and splits the data, checks delta, opens the ledger
    if not (policy.model_dir / "config.json").is_file():
        raise ConfigError(f"{policy_path}: site.model: {policy.model_dir.resolve()} is not a model "
                          "directory (no config.json); copy the federation's base model there")
    set_aside = node.ledger.set_aside.message if node.ledger.set_aside else ""
    return CheckedSite(policy_path, policy, len(node.train_units), len(node.heldout_units),
                       len(node.duplicates), node.epsilon(), set_aside)


def check_state_dir(policy: SitePolicy, policy_path: Path) -> None:
    """The node appends to its ledger (and Flower keeps its apps) in ``site.state_dir`` after a
    round of training: a directory it cannot write must fail here, not after the round.

    Nothing is created: the directory, or the nearest existing folder above it that the node
    would create it in, is probed with an anonymous temporary file; an existing ledger must
    open for appending (opened, not written).
    """
    state_dir = policy.resolve(policy.site.state_dir)

    def fail(reason: str) -> ConfigError:
        line = read_yaml(policy_path)[1].get("site.state_dir")
        where = f"{policy_path}, line {line}" if line else str(policy_path)
        return ConfigError(f"{where}: site.state_dir: {state_dir} {reason}; the node writes its "
                           "privacy ledger there after each round, so it must be a directory this "
                           "user can write")

    probe = state_dir  # the directory, else the nearest existing folder it would be made in
    while True:
        try:
            probe.stat()
            break
        except FileNotFoundError as err:
            if probe.is_symlink():
                raise fail(f"is a symbolic link to nothing ({probe} is dangling)") from err
            probe = probe.parent
        except OSError as err:
            reason = ("a symbolic link loop (ELOOP)" if err.errno == errno.ELOOP
                      else err.strerror or str(err))
            raise fail(f"cannot be used ({reason} at {err.filename or probe})") from err
    if not probe.is_dir():
        raise fail("is not a directory" if probe == state_dir
                   else f"cannot be created: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        verb = "is not writable" if probe == state_dir else f"cannot be created in {probe}"
        raise fail(f"{verb} ({err.strerror or err})") from err
    ledger = policy.ledger_path
    if ledger.exists() or ledger.is_symlink():
        try:
            with open(ledger, "ab"):
                pass
        except OSError as err:
            raise fail(f"holds a ledger {ledger} that cannot be appended to "
                       f"({err.strerror or err})") from err


def check_connection(connection: NodeConnection) -> None:
    """Fail before starting Flower if the CA or the key file is unusable."""
    try:
        check_certificate(connection.root_cert)
        check_node_private_key(connection.auth_key)
    except CertError as err:
        raise ConfigError(str(err)) from err
    host, _, port = connection.superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--superlink {connection.superlink!r}: expected host:port, "
                          "e.g. fl.coordinator.example.org:9092")


def release_statement(site: CheckedSite) -> str:
    """What leaves this site, in the words a data steward needs to sign off on."""
    policy = site.policy
    privacy, release = policy.privacy, policy.release
    unit = "patients" if privacy.unit == "patient" else "records"
    sampling = ("" if privacy.unit != "patient" else
                ", a fresh window of their text each time drawn" if privacy.patient_windows else
                ", their text cut at max_length")
    count_text = ("the number of its training / held-out " + unit + f" ({site.train_units} / "
                  f"{site.heldout_units}); the coordinator weights averaging by it"
                  if release.example_count else "withheld (sent as 1)")
    lines = [
        f"Site {policy.site.name!r}: policy {site.policy_path}",
        f"  data: {policy.data_path.resolve()} -> {site.train_units} training and {site.heldout_units} "
        f"held-out {unit} (privacy unit: one {privacy.unit}{sampling}); {site.duplicates} exact "
        "duplicate records collapsed",
        f"  base model: {policy.model_dir.resolve()}",
        f"  ledger: {policy.ledger_path.resolve()} (epsilon spent so far: {site.epsilon_spent:.3f})",
        *([f"  WARNING: {site.set_aside}"] if site.set_aside else []),
        "",
        "What leaves this site:",
        "  1. LoRA adapter updates only (no records, no text, no tokens, no per-example "
        "gradients), each trained with DP-SGD (Opacus: per-example clipping, Gaussian noise, "
        "Poisson sampling) and covered by differential privacy:",
        f"     this node stops at epsilon = {privacy.epsilon_cap:g} at delta = {privacy.delta:g} "
        f"in total over all runs and {privacy.run_budget:g} per run "
        f"({privacy.accountant_name} accounting), uses a noise multiplier of at least "
        f"{privacy.min_noise_multiplier:g}, and takes part in at most {privacy.max_rounds} "
        f"rounds per run and {privacy.max_runs} runs (evaluation-only runs count), whatever the "
        "coordinator asks; a round that would pass a cap, or a request outside the policy's "
        "limits, is declined.",
        "  2. Non-private metrics, NOT covered by differential privacy (set in the policy's "
        "release section):",
        f"     - example count: {count_text}",
        "     - training loss of each round: " + ("sent" if release.train_loss else "withheld"),
        "     - loss of the global adapter on this site's held-out "
        f"{unit}: " + ("sent" if release.eval_loss else "withheld"),
        "     - generation scores of the global adapter (ROUGE-L, BLEU and chrF of its "
        "completions of this site's held-out notes, averaged; never the text itself), when the "
        "coordinator asks: " + ("sent" if release.generation_scores else "withheld"),
        f"     - each metric only over at least {release.min_records} held-out records "
        "(release.min_records)",
        "  3. With every reply: the site name, whether the round was accepted (with the reason "
        "if declined), epsilon spent, delta, the epsilon cap, the accountant, the noise "
        "multiplier and the ledger's head (its number of entries and last hash). The "
        "noise multiplier is calibrated from the sampling rate (batch size / number of "
        f"{unit}), so it hints at the site's size even when the example count is withheld.",
        "  4. To Flower itself: the node's public key, heartbeats and message metadata.",
        "Every release is appended to the ledger before it is sent.",
        "Note: the training code that runs here is the ClientApp in the coordinator's app "
        "bundle (FAB), installed under this node's FLWR_HOME/apps; review it there.",
    ]
    return "\n".join(lines)


def node_config_value(policy_path: Path) -> str:
    """``site-policy="<abs path>"`` in Flower's ``--node-config`` syntax (a TOML string)."""
    text = str(policy_path.resolve())
    if '"' in text or "'" in text:
        raise ConfigError(f"{text}: the site policy path must not contain quotes "
                          "(Flower's --node-config cannot carry them)")
    return f"site-policy={json.dumps(text)}"


def supernode_command(site: CheckedSite, connection: NodeConnection) -> list[str]:
    """The ``flower-supernode`` command line for this site."""
    command = [flower_tool("flower-supernode"),
               "--superlink", connection.superlink,
               "--root-certificates", str(connection.root_cert.resolve()),
               "--auth-supernode-private-key", str(connection.auth_key.resolve()),
               "--node-config", node_config_value(site.policy_path),
               "--port", str(connection.runtime_port)]
    if connection.max_wait_s is not None:
        command += ["--max-wait-time", f"{connection.max_wait_s:g}"]
    return command


def node_home(site: CheckedSite) -> Path:
    """``FLWR_HOME`` of this node: next to its ledger, so installed app bundles are auditable."""
    return site.policy.resolve(site.policy.site.state_dir).resolve() / "flwr"


def run_node(policy_path: Path, connection: NodeConnection | None,
             progress: Progress = say) -> int:
    """Validate, state what leaves the site, then run the SuperNode until it stops.

    With ``connection`` None only the checks and the statement are done (``--check``).
    Returns the SuperNode's exit code (0 after Ctrl-C).
    """
    site = check_site(policy_path)
    if connection is not None:
        check_connection(connection)
    progress(release_statement(site))
    if connection is None:
        progress("\ncheck only: the policy, data and model are valid; no SuperNode started")
        return 0
    home = node_home(site)
    home.mkdir(parents=True, exist_ok=True)
    command = supernode_command(site, connection)
    progress("\nstarting the SuperNode: " + " ".join(command))
    # Same process group as this command: Ctrl-C, or the loss of the machine, stops both.
    process = subprocess.Popen(command, env=flower_env(home))
    try:
        code = process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(process)
    if code != 0:
        progress(f"the SuperNode stopped with exit code {code}. {REFUSED_HELP}")
    return code


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperNode (it stops its SuperExec and ClientApp processes itself)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
