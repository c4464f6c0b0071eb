//! The deployment files in deploy/, checked offline: the systemd unit passes
//! `systemd-analyze verify` and keeps its `systemd-analyze security` exposure
//! within a bound; the Kubernetes manifests pass kubernetes-validate's strict
//! schemas, the ServiceMonitor (a CRD, without a bundled schema) has the
//! fields prometheus-operator needs and points at the Service; and the
//! DaemonSet grants exactly the unit's capabilities, with the rest locked.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{TempDir, AGENT_BIN};
use serde_json::Value;

const UNIT: &str = "deploy/systemd/tcp-trace.service";
const UNIT_COMMAND: &str = "/usr/bin/tcp-trace serve";
const MANIFESTS: &str = "deploy/kubernetes/tcp-trace.yaml";
const SERVICE_MONITOR: &str = "deploy/kubernetes/servicemonitor.yaml";

/// The unit measured 2.4 with systemd 252 (Debian 12). Most of what is left
/// is inherent: uid 0, host network and process tree, CAP_BPF, CAP_PERFMON,
/// CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, bpf() and perf_event_open(). Loosening
/// any one setting worth 0.2 or more crosses the bound.
const EXPOSURE_BOUND: f64 = 2.5;

/// The oldest Kubernetes the manifests are written for, and the newest that
/// the pinned kubernetes-validate (1.37.0) has schemas for.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.28.0", "1.37.0"];

/// Loads every non-empty document of a YAML file with the PyYAML that
/// kubernetes-validate itself uses, and prints them as one JSON array.
const YAML_TO_JSON: &str = "import json, sys, yaml\n\
    json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate sits in the workspace")
        .join(relative)
}

/// Runs a tool that `cargo xtask setup` installs; a missing one is a failure
/// that says so, never a skipped check.
fn run_tool(program: &str, args: &[&str], package: &str) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {program}: {e} ({package}: run `cargo xtask setup`, which installs it)")
        })
}

fn python(args: &[&str]) -> Output {
    let out = run_tool("python3", args, "Debian package python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("ModuleNotFoundError") || stderr.contains("No module named") {
        panic!(
            "python3 {args:?} lacks a module: {}\n(kubernetes-validate and its PyYAML: run \
             `cargo xtask setup`, which installs them)",
            stderr.trim()
        );
    }
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The values of the unit's one `KEY=` line.
fn unit_setting(unit: &str, key: &str) -> String {
    let values: Vec<&str> = unit
        .lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect();
    assert_eq!(values.len(), 1, "the unit must set {key}= once");
    values[0].to_owned()
}

fn read_unit() -> String {
    fs::read_to_string(repo_file(UNIT)).expect("reading the unit")
}

/// The unit in a directory of its own, starting the binary under test:
/// `systemd-analyze verify` fails on an ExecStart program that is missing.
fn unit_under_test(dir: &TempDir) -> PathBuf {
    let unit = read_unit();
    assert_eq!(unit_setting(&unit, "ExecStart"), UNIT_COMMAND);
    let path = dir.join("tcp-trace.service");
    let ours = unit.replace(
        &format!("ExecStart={UNIT_COMMAND}"),
        &format!("ExecStart={AGENT_BIN} serve"),
    );
    fs::write(&path, ours).expect("writing the unit under test");
    path
}

fn systemd_analyze(args: &[&str]) -> Output {
    run_tool("systemd-analyze", args, "Debian package systemd")
}

#[test]
fn systemd_verify_accepts_the_unit() {
    let dir = TempDir::new("deploy-verify");
    let unit = unit_under_test(&dir);
    let out = systemd_analyze(&["verify", unit.to_str().unwrap()]);
    // verify exits 0 on unknown keys and values it ignores, but says so.
    let said = text(&out);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {UNIT} ({}):\n{said}",
        out.status
    );
}

#[test]
fn unit_exposure_stays_within_bound() {
    let dir = TempDir::new("deploy-security");
    let unit = unit_under_test(&dir);
    let out = systemd_analyze(&["security", "--offline=yes", unit.to_str().unwrap()]);
    let report = text(&out);
    assert!(
        out.status.success(),
        "systemd-analyze security: {}\n{report}",
        out.status
    );
    let score: f64 = report
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for tcp-trace.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(
        score <= EXPOSURE_BOUND,
        "exposure {score} is above {EXPOSURE_BOUND}:\n{report}"
    );
}

#[test]
fn manifests_pass_strict_schema_validation() {
    let manifests = repo_file(MANIFESTS);
    let mut args = vec!["-m", "kubernetes_validate", "--strict"];
    for version in KUBERNETES_VERSIONS {
        args.extend(["-k", version]);
    }
    args.push(manifests.to_str().unwrap());
    let out = python(&args);
    let report = text(&out);
    // A kind without a schema is only a warning to the validator: here it
    // fails, as does anything else that is not a pass.
    assert!(
        out.status.success() && report.lines().all(|line| line.starts_with("INFO ")),
        "kubernetes-validate {MANIFESTS} ({}):\n{report}",
        out.status
    );
    for document in yaml_documents(MANIFESTS) {
        let resource = format!(
            "{}/{}",
            str_at(&document, "/kind").to_lowercase(),
            str_at(&document, "/metadata/name")
        );
        for version in KUBERNETES_VERSIONS {
            let minor = version.rsplit_once('.').unwrap().0;
            let pass = format!("passed for resource {resource} against version {minor}");
            assert!(
                report.lines().any(|line| line.ends_with(&pass)),
                "no pass for {resource} against {minor}:\n{report}"
            );
        }
    }
}

fn yaml_documents(relative: &str) -> Vec<Value> {
    let path = repo_file(relative);
    let out = python(&["-c", YAML_TO_JSON, path.to_str().unwrap()]);
    assert!(out.status.success(), "loading {relative}:\n{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

/// The one document of `kind` in `relative`.
fn document(relative: &str, kind: &str) -> Value {
    let mut found: Vec<Value> = yaml_documents(relative)
        .into_iter()
        .filter(|document| document["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "{relative} must hold one {kind}");
    found.remove(0)
}

fn at<'v>(value: &'v Value, pointer: &str) -> &'v Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{} has no {pointer}", value["kind"]))
}

fn str_at<'v>(value: &'v Value, pointer: &str) -> &'v str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{} {pointer} is not a string", value["kind"]))
}

fn array_at<'v>(value: &'v Value, pointer: &str) -> &'v [Value] {
    at(value, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{} {pointer} is not a list", value["kind"]))
}

fn labels_at(value: &Value, pointer: &str) -> BTreeMap<String, String> {
    let labels = at(value, pointer)
        .as_object()
        .unwrap_or_else(|| panic!("{} {pointer} is not a map", value["kind"]));
    labels
        .iter()
        .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// Whether a label selector picks resources labelled `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The fields prometheus-operator's ServiceMonitor CRD requires or this
/// deployment relies on, checked by hand since no schema ships for it.
#[test]
fn service_monitor_scrapes_the_service_metrics_port() {
    let monitor = document(SERVICE_MONITOR, "ServiceMonitor");
    let service = document(MANIFESTS, "Service");
    assert_eq!(str_at(&monitor, "/apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(str_at(&monitor, "/metadata/name"), "tcp-trace");
    // A ServiceMonitor selects Services in its own namespace by default.
    assert_eq!(
        str_at(&monitor, "/metadata/namespace"),
        str_at(&service, "/metadata/namespace")
    );
    assert!(
        selects(
            &labels_at(&monitor, "/spec/selector/matchLabels"),
            &labels_at(&service, "/metadata/labels")
        ),
        "the ServiceMonitor's selector does not pick the Service"
    );
    let service_ports: BTreeSet<&str> = array_at(&service, "/spec/ports")
        .iter()
        .map(|port| str_at(port, "/name"))
        .collect();
    let endpoints = array_at(&monitor, "/spec/endpoints");
    assert!(!endpoints.is_empty(), "the ServiceMonitor scrapes nothing");
    for endpoint in endpoints {
        let port = str_at(endpoint, "/port");
        assert!(
            service_ports.contains(port),
            "endpoint port {port} is none of the Service's {service_ports:?}"
        );
        assert_eq!(str_at(endpoint, "/path"), "/metrics");
    }
}

/// `CapabilityBoundingSet=` of the unit, without the `CAP_` prefixes.
fn unit_capabilities() -> BTreeSet<String> {
    unit_setting(&read_unit(), "CapabilityBoundingSet")
        .split_whitespace()
        .map(|cap| cap.strip_prefix("CAP_").unwrap_or(cap).to_owned())
        .collect()
}

#[test]
fn daemonset_grants_the_units_capabilities_and_nothing_more() {
    let daemonset = document(MANIFESTS, "DaemonSet");
    let pod = at(&daemonset, "/spec/template/spec");
    let containers = array_at(pod, "/containers");
    assert_eq!(containers.len(), 1, "one container, the agent");
    let security = at(&containers[0], "/securityContext");

    let added: BTreeSet<String> = array_at(security, "/capabilities/add")
        .iter()
        .map(|cap| cap.as_str().expect("a capability name").to_owned())
        .collect();
    assert_eq!(added, unit_capabilities(), "DaemonSet vs unit capabilities");
    assert_eq!(
        at(security, "/capabilities/drop"),
        &serde_json::json!(["ALL"])
    );
    assert_eq!(at(security, "/allowPrivilegeEscalation"), false);
    assert_eq!(at(security, "/readOnlyRootFilesystem"), true);
    assert_ne!(security.get("privileged"), Some(&Value::Bool(true)));
    assert_eq!(at(security, "/runAsUser"), 0);
    assert_eq!(at(pod, "/hostPID"), true);
    assert_eq!(at(pod, "/hostNetwork"), true);
    assert_eq!(at(pod, "/automountServiceAccountToken"), false);
    assert!(
        containers[0].pointer("/resources/limits/memory").is_some(),
        "the agent needs a memory limit"
    );

    // Host paths, all of them mounted read-only.
    let host_volumes: BTreeSet<&str> = array_at(pod, "/volumes")
        .iter()
        .map(|volume| {
            assert!(volume.get("hostPath").is_some(), "not a hostPath: {volume}");
            str_at(volume, "/name")
        })
        .collect();
    for mount in array_at(&containers[0], "/volumeMounts") {
        let name = str_at(mount, "/name");
        assert!(
            host_volumes.contains(name),
            "mount of unknown volume {name}"
        );
        assert_eq!(at(mount, "/readOnly"), true, "{name} is mounted writable");
    }
}

#[test]
fn metrics_port_probes_service_and_annotations_agree() {
    let daemonset = document(MANIFESTS, "DaemonSet");
    let service = document(MANIFESTS, "Service");
    let template = at(&daemonset, "/spec/template");
    let container = &array_at(template, "/spec/containers")[0];
    let port = &array_at(container, "/ports")[0];
    let (port_name, port_number) = (str_at(port, "/name"), at(port, "/containerPort"));

    let args: Vec<&str> = array_at(container, "/args")
        .iter()
        .map(|arg| arg.as_str().expect("a string argument"))
        .collect();
    assert_eq!(args.first(), Some(&"serve"));
    let listen = args
        .windows(2)
        .find_map(|pair| (pair[0] == "--listen").then_some(pair[1]))
        .expect("serve --listen ADDR: the default, loopback, is unreachable from Prometheus");
    assert!(
        listen.ends_with(&format!(":{port_number}")),
        "--listen {listen} vs containerPort {port_number}"
    );

    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = at(container, &format!("/{probe}/httpGet"));
        assert_eq!(str_at(get, "/path"), "/healthz", "{probe}");
        assert_eq!(str_at(get, "/port"), port_name, "{probe}");
    }

    let annotations = labels_at(template, "/metadata/annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port_number.to_string());

    assert_eq!(str_at(&service, "/spec/clusterIP"), "None");
    assert!(
        selects(
            &labels_at(&service, "/spec/selector"),
            &labels_at(template, "/metadata/labels")
        ),
        "the Service's selector does not pick the DaemonSet's pods"
    );
    let service_port = &array_at(&service, "/spec/ports")[0];
    assert_eq!(at(service_port, "/port"), port_number);
    assert_eq!(str_at(service_port, "/targetPort"), port_name);
}
