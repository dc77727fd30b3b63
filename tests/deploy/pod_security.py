"""The Pod Security Standards' "restricted" profile (Kubernetes 1.31), as checks on a pod template.

Written from the profile's table (https://kubernetes.io/docs/concepts/security/pod-security-standards/):
every control of "baseline", which "restricted" includes, then the ones "restricted" adds. The
admission controller applies the same rules to the pods a Deployment or StatefulSet creates;
these checks run on the templates, without a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# -- baseline ----------------------------------------------------------------------------------
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"

# -- restricted --------------------------------------------------------------------------------
VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
RESTRICTED_CAPABILITIES = {"NET_BIND_SERVICE"}


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, container) of every container, init and ephemeral ones included."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            yield f"{key}/{c.get('name', '?')}", c


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """What keeps a pod template (metadata + spec) from the "restricted" profile; [] if nothing."""
    meta = template.get("metadata") or {}
    spec = template["spec"]
    psc = spec.get("securityContext") or {}
    out: list[str] = []

    def bad(what: str) -> None:
        out.append(what)

    # Baseline: HostProcess
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        bad("pod: windowsOptions.hostProcess")
    # Baseline: host namespaces
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad(f"pod: {key}")
    # Baseline: HostPath volumes; restricted: volume types
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if "hostPath" in kinds:
            bad(f"volume {v['name']}: hostPath")
        if not kinds or not kinds <= VOLUME_TYPES:
            bad(f"volume {v['name']}: type {sorted(kinds)} is not allowed")
    # Baseline: AppArmor, SELinux, seccomp, sysctls at the pod level
    if (psc.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in APPARMOR_TYPES:
        bad("pod: appArmorProfile")
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            bad(f"annotation {key}: {value}")
    _selinux(psc.get("seLinuxOptions"), "pod", bad)
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            bad(f"pod: sysctl {s.get('name')}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_TYPES:
        bad(f"pod: seccompProfile {pod_seccomp}")
    # Restricted: non-root user
    if psc.get("runAsUser") == 0:
        bad("pod: runAsUser 0")
    if psc.get("runAsNonRoot") is False:
        bad("pod: runAsNonRoot false")

    for name, c in containers(spec):
        sc = c.get("securityContext") or {}
        # Baseline
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad(f"{name}: windowsOptions.hostProcess")
        if sc.get("privileged"):
            bad(f"{name}: privileged")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                bad(f"{name}: hostPort {p['hostPort']}")
        if (sc.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in APPARMOR_TYPES:
            bad(f"{name}: appArmorProfile")
        _selinux(sc.get("seLinuxOptions"), name, bad)
        if sc.get("procMount", "Default") != "Default":
            bad(f"{name}: procMount {sc['procMount']}")
        caps = sc.get("capabilities") or {}
        added = set(caps.get("add") or [])
        if not added <= BASELINE_CAPABILITIES:
            bad(f"{name}: adds capabilities {sorted(added - BASELINE_CAPABILITIES)}")
        # Restricted: capabilities
        if "ALL" not in (caps.get("drop") or []):
            bad(f"{name}: does not drop ALL capabilities")
        if not added <= RESTRICTED_CAPABILITIES:
            bad(f"{name}: adds capabilities {sorted(added - RESTRICTED_CAPABILITIES)}")
        # Restricted: privilege escalation (must be set, to false)
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(f"{name}: allowPrivilegeEscalation is not false")
        # Restricted: non-root, at the pod level or in every container
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            bad(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad(f"{name}: runAsUser 0")
        # Restricted: seccomp, at the pod level or in every container
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_TYPES:
            bad(f"{name}: seccompProfile {seccomp} (RuntimeDefault or Localhost required)")
    return out


def _selinux(options: dict[str, Any] | None, where: str, bad: Any) -> None:
    if not options:
        return
    if options.get("type", "") not in SELINUX_TYPES:
        bad(f"{where}: seLinuxOptions.type {options['type']}")
    for key in ("user", "role"):
        if options.get(key):
            bad(f"{where}: seLinuxOptions.{key}")
