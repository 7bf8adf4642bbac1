//! A job forwarded by another super-peer whose owner's certificate a revocation list held here
//! revokes (a list of another domain, fetched from that domain's super-peer).

use mvm_component::policy::{Principal, PrincipalKind};

use super::{alice, bench, reply_now, sends};
use crate::broker::harness::jobs;
use crate::proto::{FailureKind, Response};

#[tokio::test]
async fn a_forwarded_job_whose_owners_certificate_a_list_held_here_revokes_is_refused_holding_nothing()
 {
    let mut b = bench().await;
    let n0 = b.node("n0", 4);
    // The domain's CA revokes the certificate of serial 0bad; this super-peer holds the list
    // (as one of another domain does once it has fetched it from this domain's super-peer).
    let crl = b.dir.path().join("crl");
    std::fs::create_dir_all(&crl).expect("mkdir");
    b.ca.revoke(&crl, &[0x0b, 0xad]).expect("revoke");
    let pem = std::fs::read_to_string(crl.join(crate::pki::CRL_FILE)).expect("the list");
    let der = crate::pki::crl_der(&pem).expect("PEM");
    let taken = b.core.site.net.trust().adopt_crl(&der).expect("signed");
    assert!(taken.is_some(), "a newer list is taken");
    // A super-peer forwards alice's job, sent to it with that certificate: refused here.
    let forwarder = Principal {
        kind: PrincipalKind::Node,
        name: "sp9".into(),
        domain: "default".into(),
        roles: vec!["superpeer".into()],
    };
    let mut job = jobs::sleeping("nap", 10);
    job.submission.hops = 1;
    job.submission.on_behalf = Some(alice());
    job.submission.owner_cert = Some("0bad".into());
    let (effects, mut rx) = b.submit_as(forwarder.clone(), &job);
    let rest = reply_now(b.settle(effects).await);
    assert!(sends(rest).is_empty(), "nothing is woken for a refused job");
    match rx.try_recv() {
        Ok(Response::Error(f)) => {
            assert_eq!(f.kind, FailureKind::Refused, "{f:?}");
            assert!(
                f.message.contains("alice@default")
                    && f.message.contains("serial 0bad")
                    && f.message.contains("revoked"),
                "{f:?}"
            );
        }
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(b.core.ledger.slots(&n0), 0, "nothing held");
    assert_eq!(b.log.read(|s| s.jobs().count()), 0, "nothing recorded");
    // Forwarded without a serial, or with one that is not hex: refused too (no list could be
    // checked against it).
    for bad in [
        None,
        Some("not-hex".to_string()),
        Some("ab".repeat(21)),
        Some("abc".to_string()),
    ] {
        job.submission.owner_cert = bad.clone();
        let (effects, mut rx) = b.submit_as(forwarder.clone(), &job);
        let rest = reply_now(b.settle(effects).await);
        assert!(sends(rest).is_empty(), "{bad:?}: nothing is woken");
        match rx.try_recv() {
            Ok(Response::Error(f)) => {
                assert_eq!(f.kind, FailureKind::Refused, "{f:?}");
                assert!(
                    f.message.contains("sp9") && f.message.contains("without the serial"),
                    "{f:?}"
                );
            }
            other => panic!("{bad:?}: not refused: {other:?}"),
        }
    }
    assert_eq!(b.log.read(|s| s.jobs().count()), 0, "nothing recorded");
    // The same job sent with another certificate of hers, not revoked, is taken.
    job.submission.owner_cert = Some("0bee".into());
    let (effects, _rx) = b.submit_as(forwarder, &job);
    let rest = reply_now(b.settle(effects).await);
    assert_eq!(sends(rest).len(), 1, "placed on n0");
}
