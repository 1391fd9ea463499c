//! Leader election against the mock API server: one holder at a time, renewals, takeover.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::FakeApi;
use shoal_operator::leader::LeaderElector;

#[tokio::test]
async fn only_one_replica_holds_the_lease_and_the_holder_renews_it() {
    let (fake, client) = FakeApi::start();
    let a = LeaderElector::new(
        client.clone(),
        "shoal-system",
        "shoal-operator",
        "pod-a",
        Duration::from_secs(15),
    );
    let b = LeaderElector::new(
        client,
        "shoal-system",
        "shoal-operator",
        "pod-b",
        Duration::from_secs(15),
    );
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(!b.try_acquire_or_renew().await.unwrap());
    let path = "/apis/coordination.k8s.io/v1/namespaces/shoal-system/leases/shoal-operator";
    let before = fake.get(path).unwrap();
    assert_eq!(before["spec"]["holderIdentity"], "pod-a");
    assert!(a.try_acquire_or_renew().await.unwrap());
    let after = fake.get(path).unwrap();
    assert_ne!(
        before["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );
    assert_eq!(after["spec"]["holderIdentity"], "pod-a");
    let methods: Vec<String> = fake.take_log().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["GET", "POST", "GET", "GET", "PUT"]);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_counted_as_a_transition() {
    let (fake, client) = FakeApi::start();
    let path = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l";
    fake.put(
        path,
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"holderIdentity": "dead-pod", "leaseDurationSeconds": 15,
                     "renewTime": "2020-01-01T00:00:00.000000Z", "leaseTransitions": 2}
        }),
    );
    let b = LeaderElector::new(client, "ns", "l", "pod-b", Duration::from_secs(15));
    assert!(b.try_acquire_or_renew().await.unwrap());
    let l = fake.get(path).unwrap();
    assert_eq!(l["spec"]["holderIdentity"], "pod-b");
    assert_eq!(l["spec"]["leaseTransitions"], 3);
}
