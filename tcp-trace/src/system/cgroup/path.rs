//! Where a cgroup path says its processes run: systemd unit, container, pod.
//!
//! Only shapes that runtimes and kubelet really create are read; anything
//! else leaves the field `None` rather than guessing.

use crate::model::Placement;

/// Reads the unit, container and pod out of a cgroup path (pure parsing).
pub fn placement_of(path: &str) -> Placement {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    Placement {
        cgroup: format!("/{}", parts.join("/")),
        unit: parts
            .iter()
            .rev()
            .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
            .map(|p| p.to_string()),
        // The outermost: cgroups nested in a container (podman's
        // `/container`, a containerised systemd's units) belong to it.
        container: (0..parts.len())
            .find_map(|at| container_id_at(&parts, at).filter(|id| is_container_id(id)))
            .map(str::to_string),
        pod_uid: (0..parts.len())
            .find_map(|at| pod_uid_at(&parts, at))
            .map(|uid| uid.replace('_', "-")),
    }
}

/// Scope prefixes of runtimes that name a container's cgroup
/// `<prefix>-<id>.scope` (systemd cgroup driver). `crio-conmon-<id>.scope`
/// holds CRI-O's monitor, not the container, and does not match.
const CONTAINER_SCOPES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];

/// What would be a container id if component `at` names a container: a
/// runtime's scope anywhere, `docker/<id>`, or a container directly under a
/// pod in kubelet's cgroupfs layout (`<id>`, or `crio-<id>` from CRI-O).
fn container_id_at<'a>(parts: &[&'a str], at: usize) -> Option<&'a str> {
    let part = parts[at];
    let scope_id = container_scope_id(part);
    let Some(parent_at) = at.checked_sub(1) else {
        return scope_id;
    };
    let parent = parts[parent_at];
    let under_cgroupfs_pod = cgroupfs_pod_uid(&parts[..parent_at], parent).is_some();
    scope_id
        .or_else(|| (parent == "docker").then_some(part))
        .or_else(|| under_cgroupfs_pod.then(|| part.strip_prefix("crio-").unwrap_or(part)))
}

/// `docker-<id>.scope` and the like: the id part.
fn container_scope_id(part: &str) -> Option<&str> {
    let name = part.strip_suffix(".scope")?;
    CONTAINER_SCOPES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
}

/// Container ids are exactly 64 lowercase hex digits.
fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The raw pod uid if component `at` is a pod's cgroup, in either kubelet
/// layout: systemd (`kubepods-burstable-pod<uid>.slice`, `_` for `-`) or
/// cgroupfs (`kubepods/burstable/pod<uid>`).
fn pod_uid_at<'a>(parts: &[&'a str], at: usize) -> Option<&'a str> {
    systemd_pod_uid(parts[at]).or_else(|| cgroupfs_pod_uid(&parts[..at], parts[at]))
}

/// `kubepods[-qos]-pod<uid>.slice`, also under a prefix (kind nests
/// `kubelet-kubepods-...`).
fn systemd_pod_uid(part: &str) -> Option<&str> {
    let (prefix, uid) = part.strip_suffix(".slice")?.rsplit_once("-pod")?;
    let without_qos = ["-burstable", "-besteffort"]
        .iter()
        .find_map(|qos| prefix.strip_suffix(qos))
        .unwrap_or(prefix);
    let under_kubepods = without_qos == "kubepods" || without_qos.ends_with("-kubepods");
    (under_kubepods && is_pod_uid(uid)).then_some(uid)
}

/// `pod<uid>` directly under `kubepods` or under its `burstable`/`besteffort`.
fn cgroupfs_pod_uid<'a>(parents: &[&str], part: &'a str) -> Option<&'a str> {
    let uid = part.strip_prefix("pod")?;
    let under_kubepods = match parents {
        [.., "kubepods"] => true,
        [.., "kubepods", qos] => matches!(*qos, "burstable" | "besteffort"),
        _ => false,
    };
    (under_kubepods && is_pod_uid(uid)).then_some(uid)
}

/// Pod uids are UUIDs, or 32 hex digits for static pods; systemd slice
/// names carry `_` where the uid has `-`.
fn is_pod_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "3f4c1c2b5a6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9011223344556677";
    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const UID_SYSTEMD: &str = "1b4e28ba_2fa1_11d2_883f_0016d3cca427";

    fn placement(
        cgroup: &str,
        unit: Option<&str>,
        container: Option<&str>,
        pod_uid: Option<&str>,
    ) -> Placement {
        Placement {
            cgroup: cgroup.into(),
            unit: unit.map(Into::into),
            container: container.map(Into::into),
            pod_uid: pod_uid.map(Into::into),
        }
    }

    #[test]
    fn root_and_plain_slices_say_nothing() {
        assert_eq!(placement_of("/"), placement("/", None, None, None));
        assert_eq!(placement_of(""), placement("/", None, None, None));
        assert_eq!(
            placement_of("/user.slice"),
            placement("/user.slice", None, None, None)
        );
    }

    #[test]
    fn a_service_is_its_unit() {
        let path = "/system.slice/nginx.service";
        assert_eq!(
            placement_of(path),
            placement(path, Some("nginx.service"), None, None)
        );
    }

    #[test]
    fn the_innermost_unit_wins() {
        let path = "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.scope";
        assert_eq!(placement_of(path).unit.as_deref(), Some("foo.scope"));
        let path = "/user.slice/user-1000.slice/user@1000.service/app.slice";
        assert_eq!(
            placement_of(path).unit.as_deref(),
            Some("user@1000.service")
        );
    }

    #[test]
    fn the_path_is_normalised() {
        let path = format!("system.slice//docker-{HEX}.scope/");
        assert_eq!(
            placement_of(&path).cgroup,
            format!("/system.slice/docker-{HEX}.scope")
        );
    }

    #[test]
    fn docker_under_systemd() {
        let scope = format!("docker-{HEX}.scope");
        let path = format!("/system.slice/{scope}");
        assert_eq!(
            placement_of(&path),
            placement(&path, Some(&scope), Some(HEX), None)
        );
    }

    #[test]
    fn docker_under_cgroupfs() {
        let path = format!("/docker/{HEX}");
        assert_eq!(placement_of(&path), placement(&path, None, Some(HEX), None));
    }

    #[test]
    fn kubernetes_pods_under_systemd_in_every_qos_class() {
        for (qos_slice, pod_slice) in [
            ("", format!("kubepods-pod{UID_SYSTEMD}.slice")),
            (
                "kubepods-burstable.slice/",
                format!("kubepods-burstable-pod{UID_SYSTEMD}.slice"),
            ),
            (
                "kubepods-besteffort.slice/",
                format!("kubepods-besteffort-pod{UID_SYSTEMD}.slice"),
            ),
        ] {
            let scope = format!("cri-containerd-{HEX}.scope");
            let path = format!("/kubepods.slice/{qos_slice}{pod_slice}/{scope}");
            assert_eq!(
                placement_of(&path),
                placement(&path, Some(&scope), Some(HEX), Some(UID)),
                "{path}"
            );
            // The pod's own slice: a pod, no container yet.
            let pod = format!("/kubepods.slice/{qos_slice}{pod_slice}");
            assert_eq!(placement_of(&pod), placement(&pod, None, None, Some(UID)));
        }
    }

    #[test]
    fn kubernetes_pods_nested_under_a_prefix() {
        // kind runs kubelet with cgroup root /kubelet.
        let path = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{HEX}.scope"
        );
        let p = placement_of(&path);
        assert_eq!(
            (p.pod_uid.as_deref(), p.container.as_deref()),
            (Some(UID), Some(HEX))
        );
    }

    #[test]
    fn static_pods_have_hex_uids() {
        let uid = "6d3c5b6e7a8f9e0d1c2b3a4f5e6d7c8b";
        let path = format!("/kubepods.slice/kubepods-pod{uid}.slice/crio-{HEX}.scope");
        assert_eq!(placement_of(&path).pod_uid.as_deref(), Some(uid));
    }

    #[test]
    fn kubernetes_pods_under_cgroupfs() {
        for pod in [
            format!("/kubepods/pod{UID}"),
            format!("/kubepods/burstable/pod{UID}"),
            format!("/kubepods/besteffort/pod{UID}"),
        ] {
            assert_eq!(placement_of(&pod), placement(&pod, None, None, Some(UID)));
            for child in [HEX.to_string(), format!("crio-{HEX}")] {
                let path = format!("{pod}/{child}");
                assert_eq!(
                    placement_of(&path),
                    placement(&path, None, Some(HEX), Some(UID)),
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn cri_o_scopes_and_its_monitor() {
        let pod = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
        );
        let scope = format!("crio-{HEX}.scope");
        let path = format!("{pod}/{scope}");
        assert_eq!(
            placement_of(&path),
            placement(&path, Some(&scope), Some(HEX), Some(UID))
        );
        let conmon = format!("crio-conmon-{HEX}.scope");
        let path = format!("{pod}/{conmon}");
        assert_eq!(
            placement_of(&path),
            placement(&path, Some(&conmon), None, Some(UID))
        );
    }

    #[test]
    fn podman_scopes_and_their_nested_container_cgroup() {
        let scope = format!("libpod-{HEX}.scope");
        let path = format!("/machine.slice/{scope}");
        assert_eq!(
            placement_of(&path),
            placement(&path, Some(&scope), Some(HEX), None)
        );
        let nested = format!("{path}/container");
        assert_eq!(
            placement_of(&nested),
            placement(&nested, Some(&scope), Some(HEX), None)
        );
    }

    #[test]
    fn containerd_itself_is_a_service_not_a_container() {
        let path = "/system.slice/containerd.service";
        assert_eq!(
            placement_of(path),
            placement(path, Some("containerd.service"), None, None)
        );
    }

    #[test]
    fn container_ids_must_be_64_lowercase_hex_digits() {
        let short = &HEX[..63];
        let long = format!("{HEX}0");
        let upper = HEX.to_uppercase();
        let not_hex = format!("{}g", &HEX[..63]);
        for id in [short, &long, &upper, &not_hex] {
            for path in [
                format!("/system.slice/docker-{id}.scope"),
                format!("/docker/{id}"),
                format!("/kubepods/burstable/pod{UID}/{id}"),
            ] {
                assert_eq!(placement_of(&path).container, None, "{path}");
            }
        }
    }

    #[test]
    fn hex_elsewhere_is_not_a_container() {
        for path in [
            format!("/system.slice/{HEX}"),
            format!("/system.slice/foo-{HEX}.scope"),
            format!("/docker-{HEX}.slice"),
            format!("/kubepods/burstable/{HEX}"),
            format!("/kubepods/burstable/pod{UID}/x/{HEX}"),
            format!("/kubepods/podxyz/{HEX}"),
            // Only cgroupfs pods hold bare ids; systemd ones hold scopes.
            format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/{HEX}"),
        ] {
            assert_eq!(placement_of(&path).container, None, "{path}");
        }
    }

    #[test]
    fn pods_only_under_kubepods() {
        for path in [
            format!("/system.slice/pod{UID}"),
            format!("/kubepods/guaranteed/pod{UID}"),
            format!("/other-pod{UID_SYSTEMD}.slice"),
            "/kubepods/pod".to_string(),
            "/kubepods/podxyz".to_string(),
        ] {
            assert_eq!(placement_of(&path).pod_uid, None, "{path}");
        }
    }
}
