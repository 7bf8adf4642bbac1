//! The bank through real daemons in one process ([`super::harness`]): mints by an
//! administrator only, transfers from one's own account only and never below zero, a request
//! sent again applied once, and balances intact after the leading super-peer is stopped.

use super::harness::Setup;
use crate::client::Client;
use crate::proto::{BankRequest, FailureKind, MICRO};

async fn balance(c: &Client, account: &str) -> u64 {
    let a = c
        .bank(BankRequest::Balance {
            account: Some(account.into()),
            all: false,
        })
        .await
        .expect("balance");
    a.accounts[0].1
}

fn transfer(to: &str, credits: u64, request: &str) -> BankRequest {
    BankRequest::Transfer {
        from: None,
        to: to.into(),
        amount: credits * MICRO,
        request: request.into(),
        memo: "test".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_move_once_never_below_zero_and_survive_the_leader() {
    let mut lab = Setup::in_domain("physics", 3, &[1])
        .example_policies()
        .start()
        .await;
    let root = lab.client_as(&lab.user_as("root", &["admin"])).await;
    let alice = lab.client_as(&lab.user_as("alice", &["researcher"])).await;
    let mint = BankRequest::Mint {
        to: "alice@physics".into(),
        amount: 100 * MICRO,
        request: "m1".into(),
    };
    // Only an administrator creates credits.
    let e = alice.bank(mint.clone()).await.expect_err("not an admin");
    assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
    let a = root.bank(mint.clone()).await.expect("mint");
    assert_eq!(a.transactions[0].amount, 100 * MICRO, "{a:?}");
    let t = alice
        .bank(transfer("bob@physics", 30, "t1"))
        .await
        .expect("transfer");
    let seq = t.transactions[0].seq;
    assert_eq!(balance(&alice, "alice@physics").await, 70 * MICRO);
    // More than it holds: refused, nothing moved.
    let e = alice
        .bank(transfer("bob@physics", 71, "t2"))
        .await
        .expect_err("too much");
    assert!(e.message.contains("less than"), "{e:?}");
    // From another's account, or reading it: refused.
    let e = alice
        .bank(BankRequest::Transfer {
            from: Some("bob@physics".into()),
            to: "alice@physics".into(),
            amount: MICRO,
            request: "t3".into(),
            memo: String::new(),
        })
        .await
        .expect_err("bob's");
    assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
    let e = alice
        .bank(BankRequest::Balance {
            account: Some("bob@physics".into()),
            all: false,
        })
        .await
        .expect_err("bob's balance");
    assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
    // A bad account name names itself.
    let e = root
        .bank(transfer("nobody", 1, "t4"))
        .await
        .expect_err("bad name");
    assert!(e.message.contains("'nobody' is not an account"), "{e:?}");

    // The leading super-peer stops: the next leader has every balance, and a request sent
    // again (the same ids) is not applied twice.
    let old = lab.leader().await;
    lab.superpeers[old].stop().await;
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let alice = lab
        .client_among(&lab.user_as("alice", &["researcher"]), &rest)
        .await;
    let root = lab
        .client_among(&lab.user_as("root", &["admin"]), &rest)
        .await;
    let again = alice
        .bank(transfer("bob@physics", 30, "t1"))
        .await
        .expect("the same transfer again");
    assert_eq!(again.transactions[0].seq, seq, "{again:?}");
    root.bank(mint).await.expect("the same mint again");
    let all = root
        .bank(BankRequest::Balance {
            account: None,
            all: true,
        })
        .await
        .expect("all");
    assert_eq!(
        all.accounts,
        vec![
            ("user:alice@physics".to_owned(), 70 * MICRO),
            ("user:bob@physics".to_owned(), 30 * MICRO)
        ],
        "{all:?}"
    );
    let h = alice
        .bank(BankRequest::History {
            account: None,
            limit: 10,
        })
        .await
        .expect("history");
    assert_eq!(h.transactions.len(), 2, "the mint and the transfer: {h:?}");
}
