use super::*;

const ORIGINAL: &str = include_str!("../../../examples/original/ces-conf.yaml");

fn errors(text: &str) -> Vec<String> {
    match CesConfig::from_yaml(text, "ces-conf.yaml") {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn the_original_sample_loads_with_every_key() {
    let c = CesConfig::from_yaml(ORIGINAL, "ces-conf.yaml").expect("original sample loads");
    assert_eq!(c.cluster_name, "k8s");
    assert_eq!(c.master_cluster(), "k8s");
    assert!(c.is_support_route_domain);
    assert_eq!(c.schema_version(), "3.29.0");
    assert_eq!(c.i_rule, ["bwc-1mbps-irule", "bwc-2mbps-irule", "bwc-3mbps-irule"]);
    let names: Vec<_> = c.tenant.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["Common", "p2", "project3"]);
    assert_eq!(c.tenant[0].namespaces, ["dwb-test1", "dwb-test"]);
    assert_eq!(c.tenant[2].namespaces, ["project3", "test-ns-a"]);
    let rd = c.tenant[1].route_domain.as_ref().unwrap();
    assert_eq!((rd.id, rd.name.as_str()), (Some(2), "rd2"));
    assert_eq!(c.tenant[1].gw_pool.as_ref().unwrap().server_addresses, ["1.16.10.22", "192.168.10.22"]);
    assert!(c.tenant[2].virtual_service.as_ref().unwrap().template.as_deref().unwrap().contains("Service_L4"));
    let lp = c.log_pool.as_ref().unwrap();
    assert!(lp.logging_enabled && !lp.enable_remote_log);
    assert_eq!(lp.health_monitor, "tcp");
    assert_eq!(c.tenant_of("project3"), "project3");
    assert_eq!(c.tenant_of("default"), "p2");
    assert_eq!(c.tenant_of("dwb-test"), "Common");
    assert_eq!(c.tenant_of("unlisted"), "Common");
    assert_eq!(c.tenant[1].default_action(), DefaultAction::Drop);
}

#[test]
fn defaults_match_the_original() {
    let c = CesConfig::from_yaml("clusterName: c1\ntenant: [{name: Common}]\n", "f").unwrap();
    assert_eq!(c.master_cluster(), "c1");
    assert!(!c.is_support_route_domain);
    assert_eq!(c.schema_version(), DEFAULT_SCHEMA_VERSION);
    assert_eq!(c.cni_type(), "kube-ovn");
    assert!(c.i_rule.is_empty());
    assert!(c.log_pool.is_none());
}

#[test]
fn without_route_domains_every_namespace_is_common() {
    let c = CesConfig::from_yaml(
        "clusterName: c\nisSupportRouteDomain: false\ntenant: [{name: Common}, {name: t1, namespaces: a}]\n",
        "f",
    )
    .unwrap();
    assert_eq!(c.tenant_of("a"), "Common");
}

#[test]
fn namespaces_may_be_a_list_and_are_trimmed() {
    let c = CesConfig::from_yaml(
        "clusterName: c\nisSupportRouteDomain: true\ntenant:\n- {name: Common, namespaces: ' a , b,'}\n- {name: t, namespaces: [c, ' d'], routeDomain: {id: 3, name: rd3}}\n",
        "f",
    )
    .unwrap();
    assert_eq!(c.tenant[0].namespaces, ["a", "b"]);
    assert_eq!(c.tenant[1].namespaces, ["c", "d"]);
    assert_eq!(c.tenant_of("d"), "t");
}

#[test]
fn an_unknown_key_names_file_and_path() {
    let e = errors("clusterName: c\ntenant:\n- name: Common\n  virtualService:\n    virtualAddress: 1.2.3.4\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("ces-conf.yaml: tenant[0].virtualService.virtualAddress: unknown field `virtualAddress`, expected `template` or `virtualAddresses`"), "{}", e[0]);
}

#[test]
fn a_wrong_type_names_the_key() {
    let e = errors("clusterName: c\ntenant:\n- name: Common\n  routeDomain: {id: 70000, name: x}\n");
    assert!(e[0].starts_with("ces-conf.yaml: tenant[0].routeDomain.id: "), "{}", e[0]);
    let e = errors("clusterName: c\nisSupportRouteDomain: sometimes\ntenant: [{name: Common}]\n");
    assert!(e[0].contains("isSupportRouteDomain"), "{}", e[0]);
}

#[test]
fn malformed_yaml_is_reported_not_panicked() {
    let e = errors("clusterName: [unclosed\n");
    assert!(e[0].starts_with("ces-conf.yaml: not valid YAML"), "{}", e[0]);
    let e = errors("");
    assert!(e[0].contains("empty"), "{}", e[0]);
}

#[test]
fn semantic_problems_are_all_reported() {
    let e = errors(
        "clusterName: 9bad\nschemaVersion: latest\nisSupportRouteDomain: true\ntenant:\n\
         - {name: p1, namespaces: 'a,b'}\n\
         - {name: p2, namespaces: b, routeDomain: {id: 2, name: rd2}, gwPool: {serverAddresses: [not-ip]}}\n\
         - {name: p2, routeDomain: {id: 3, name: rd3}, virtualService: {template: '{not json'}}\n\
         logPool: {loggingEnabled: true, serverAddresses: ['1.2.3.4:99999'], template: '[]'}\n",
    );
    let joined = e.join("\n");
    for needle in [
        "clusterName: `9bad` is not a valid AS3 name prefix",
        "schemaVersion: `latest`",
        "tenant: no entry named `Common`",
        "tenant[0].routeDomain.name: is required when isSupportRouteDomain is true",
        "tenant[1].namespaces: namespace `b` is already mapped to tenant `p1`",
        "tenant[1].gwPool.serverAddresses[0]: `not-ip` is not an IP address",
        "tenant[2].name: `p2` is also the name of tenant[1]",
        "tenant[2].virtualService.template: is not valid JSON",
        "logPool.serverAddresses[0]: `1.2.3.4:99999`",
        "logPool.template: must be a JSON object",
        "logPool.healthMonitor: is required",
    ] {
        assert!(joined.contains(needle), "missing `{needle}` in:\n{joined}");
    }
}

#[test]
fn default_action_is_a_new_per_tenant_key() {
    let c = CesConfig::from_yaml("clusterName: c\ntenant: [{name: Common, defaultAction: reject}]\n", "f").unwrap();
    assert_eq!(c.tenant(COMMON).unwrap().default_action(), DefaultAction::Reject);
    let e = errors("clusterName: c\ntenant: [{name: Common, defaultAction: allow}]\n");
    assert!(e[0].contains("tenant[0].defaultAction: unknown variant `allow`"), "{}", e[0]);
}

#[test]
fn embedded_default_is_valid() {
    let c = CesConfig::embedded_default();
    assert_eq!(c.tenant_of("anything"), COMMON);
    assert_eq!(c.tenant(COMMON).unwrap().default_action(), DefaultAction::Drop);
}

#[test]
fn host_port_parsing() {
    assert_eq!(parse_host_port("1.2.3.4"), Some(("1.2.3.4".parse().unwrap(), 514)));
    assert_eq!(parse_host_port("1.2.3.4:601"), Some(("1.2.3.4".parse().unwrap(), 601)));
    assert_eq!(parse_host_port("[::1]:601"), Some(("::1".parse().unwrap(), 601)));
    assert_eq!(parse_host_port("host:1"), None);
}

#[test]
fn route_domains_need_an_id_and_are_unique_across_tenants() {
    // Issue 2's code took `{name: x}` as id 0 (Common's) and let two tenants share a route domain.
    let e = errors(
        "clusterName: c\nisSupportRouteDomain: true\ntenant:\n\
         - {name: Common}\n\
         - {name: a, namespaces: a, routeDomain: {name: rda}}\n\
         - {name: b, namespaces: b, routeDomain: {id: 7, name: rdb}}\n\
         - {name: c, namespaces: c, routeDomain: {id: 7, name: rdb}}\n\
         - {name: d, namespaces: d, routeDomain: {id: 0, name: rdd}}\n",
    );
    let joined = e.join("\n");
    for needle in [
        "tenant[1].routeDomain.id: is required when isSupportRouteDomain is true",
        "tenant[3].routeDomain.id: 7 is also the route domain of tenant[2]",
        "tenant[3].routeDomain.name: `rdb` is also the route domain of tenant[2]",
        "tenant[4].routeDomain.id: 0 is the route domain of Common",
    ] {
        assert!(joined.contains(needle), "missing `{needle}` in:\n{joined}");
    }
    assert_eq!(e.len(), 4, "{joined}");
}

#[test]
fn values_follow_the_crd_patterns() {
    let e = errors(
        "clusterName: c\ntenant: [{name: Common}]\n\
         externalIPAddresses: ['10.0.0.9-10.0.0.1', '10.0.0.1-2001:db8::1', '10.0.0.1-', '+10.0.0.1']\n\
         logPool: {serverAddresses: ['1.2.3.4:+514'], healthMonitor: tcp}\n",
    );
    let joined = e.join("\n");
    for needle in [
        "externalIPAddresses[0]: range `10.0.0.9-10.0.0.1` is reversed",
        "externalIPAddresses[1]: range `10.0.0.1-2001:db8::1` mixes IPv4 and IPv6",
        "externalIPAddresses[2]: `10.0.0.1-` is not an IP address or a range",
        "externalIPAddresses[3]: `+10.0.0.1` is not an IP address",
        "logPool.serverAddresses[0]: `1.2.3.4:+514` is not `ip` or `ip:port`",
    ] {
        assert!(joined.contains(needle), "missing `{needle}` in:\n{joined}");
    }
}

#[test]
fn gateway_keys_are_checked() {
    let c = CesConfig::from_yaml(
        "clusterName: c\ngateway: {table: ces_gw}\ntenant: [{name: Common, gateway: {interfaces: [veth-a, eth1]}}]\n",
        "f",
    )
    .unwrap();
    assert_eq!(c.gateway_table(), "ces_gw");
    assert_eq!(CesConfig::embedded_default().gateway_table(), "ces");
    let e = errors(
        "clusterName: c\nisSupportRouteDomain: true\ngateway: {table: 'my table'}\ntenant:\n\
         - {name: Common, gateway: {interfaces: [eth1, 'a/b']}}\n\
         - {name: t, routeDomain: {id: 2, name: rd2}, gateway: {interfaces: [eth1, averyveryverylongname]}}\n",
    );
    let joined = e.join("\n");
    for needle in [
        "gateway.table: `my table` is not a table name",
        "tenant[0].gateway.interfaces[1]: `a/b` is not an interface name",
        "tenant[1].gateway.interfaces[0]: interface `eth1` is already tenant `Common`'s",
        "tenant[1].gateway.interfaces[1]: `averyveryverylongname` is not an interface name",
    ] {
        assert!(joined.contains(needle), "missing `{needle}` in:\n{joined}");
    }
}
