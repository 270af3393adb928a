//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go does it: the holder renews the Lease
//! every `renew` seconds; another replica takes it over when it has not been renewed for `duration`. Updates carry
//! the Lease's `resourceVersion`, so two replicas never both win a takeover.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

pub struct Elector {
    api: Api<Lease>,
    name: String,
    pub identity: String,
    pub duration: Duration,
}

/// What a try at the Lease found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leadership {
    Leader,
    /// Someone else holds it.
    Follower(String),
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Elector {
        Elector { api: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), duration }
    }

    fn now() -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::now())
    }

    /// Takes or renews the Lease when it is ours or has expired.
    pub async fn try_acquire(&self) -> Result<Leadership, String> {
        let secs = self.duration.as_secs().max(1) as i32;
        let fresh = |transitions: i32, meta: ObjectMeta| Lease {
            metadata: meta,
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(Self::now()),
                renew_time: Some(Self::now()),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        };
        match self.api.get_opt(&self.name).await.map_err(|e| format!("lease {}: {e}", self.name))? {
            None => {
                let meta = ObjectMeta { name: Some(self.name.clone()), ..Default::default() };
                match self.api.create(&PostParams::default(), &fresh(0, meta)).await {
                    Ok(_) => Ok(Leadership::Leader),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(Leadership::Follower("(just created)".into())),
                    Err(e) => Err(format!("lease {}: {e}", self.name)),
                }
            }
            Some(lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let holder = spec.holder_identity.clone().unwrap_or_default();
                let renewed = spec.renew_time.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
                let duration = spec.lease_duration_seconds.unwrap_or(secs) as i64;
                let expired = jiff::Timestamp::now().as_second() - renewed > duration;
                if holder != self.identity && !expired && !holder.is_empty() {
                    return Ok(Leadership::Follower(holder));
                }
                let mut next = if holder == self.identity {
                    let mut l = lease.clone();
                    if let Some(s) = l.spec.as_mut() {
                        s.renew_time = Some(Self::now());
                        s.lease_duration_seconds = Some(secs);
                    }
                    l
                } else {
                    fresh(spec.lease_transitions.unwrap_or(0) + 1, lease.metadata.clone())
                };
                next.metadata.managed_fields = None;
                match self.api.replace(&self.name, &PostParams::default(), &next).await {
                    Ok(_) => Ok(Leadership::Leader),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(Leadership::Follower(holder)),
                    Err(e) => Err(format!("lease {}: {e}", self.name)),
                }
            }
        }
    }
}
