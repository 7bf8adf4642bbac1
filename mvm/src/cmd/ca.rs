//! `mvm ca`: a domain's certificate authority, and the identities it issues.

use std::path::PathBuf;

use mvm_component::policy::PrincipalKind;
use mvm_superpeer::pki::{Ca, Subject, Trust};

use crate::exit::{Failure, input};

/// Arguments of `mvm ca`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, clap::Subcommand)]
enum Which {
    /// Create a domain's CA: DIR/ca.crt (0644) and DIR/ca.key (0600); never overwrites.
    Init {
        /// The domain.
        #[arg(long)]
        domain: String,
        /// Where to put it (default: ./ca/DOMAIN).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Days it is valid.
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(i64).range(1..=36_500))]
        days: i64,
    },
    /// Issue an identity into OUT: `key` (a new libp2p key, 0600, unless --key), `cert.pem`
    /// and `ca.pem`; never overwrites. A daemon uses OUT as its `--identity` (or state
    /// directory), a user as `mvm submit --identity OUT`.
    Issue {
        /// The CA directory (from `mvm ca init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Where to write the identity.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Certify this existing libp2p key instead of making one (e.g. a node's DIR/key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Roles, comma-separated (e.g. `researcher,member`; a super-peer's node: `superpeer`).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Days it is valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..=36_500))]
        days: i64,
        /// `node` or `user`.
        #[arg(value_enum)]
        kind: Kind,
        /// The node's or user's name in the domain.
        name: String,
    },
    /// Revoke a certificate: writes the CA's revocation list (DIR/ca.crl) again with its serial
    /// added, numbered one higher and signed. The daemons that hold the list (`--crl`) read it
    /// within two heartbeats and hand it on; each then refuses the certificate and closes the
    /// connections of the peer that holds it.
    Revoke {
        /// The CA directory (from `mvm ca init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The certificate (PEM), e.g. an identity's `cert.pem`.
        #[arg(required_unless_present = "serial", conflicts_with = "serial")]
        cert: Option<PathBuf>,
        /// Its serial number instead (hex, as `mvm ca show` prints it).
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
    },
    /// Check a certificate against CA certificates and print who it names.
    Show {
        /// The certificate (PEM).
        cert: PathBuf,
        /// A CA certificate to check it against (repeatable; default: `ca.pem` beside it).
        #[arg(long = "trust", value_name = "FILE")]
        trust: Vec<PathBuf>,
    },
}

/// The kinds of identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    /// A node or super-peer.
    Node,
    /// A person.
    User,
}

/// A trust store of `files`, or of `ca.pem` beside `cert` when none is given.
pub(crate) fn trust_for(cert: &std::path::Path, files: &[PathBuf]) -> Result<Trust, Failure> {
    let mut t = Trust::default();
    if files.is_empty() {
        let beside = cert
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("ca.pem");
        t.add_file(&beside).map_err(input)?;
    }
    for f in files {
        t.add_file(f).map_err(input)?;
    }
    Ok(t)
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    match args.which {
        Which::Init { domain, dir, days } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("ca").join(&domain));
            let ca = Ca::init(&dir, &domain, days).map_err(input)?;
            println!(
                "CA of domain {} in {} (ca.crt, ca.key)",
                ca.domain(),
                dir.display()
            );
            Ok(())
        }
        Which::Issue {
            ca,
            out,
            key,
            roles,
            days,
            kind,
            name,
        } => {
            let authority = Ca::load(&ca).map_err(input)?;
            let subject = Subject {
                kind: match kind {
                    Kind::Node => PrincipalKind::Node,
                    Kind::User => PrincipalKind::User,
                },
                name,
                roles,
            };
            let p = authority
                .issue(&subject, &out, key.as_deref(), days)
                .map_err(input)?;
            println!("{p} in {}", out.display());
            Ok(())
        }
        Which::Revoke { ca, cert, serial } => {
            let authority = Ca::load(&ca).map_err(input)?;
            let serial = match (cert, serial) {
                (Some(c), _) => {
                    let text = std::fs::read_to_string(&c)
                        .map_err(|e| input(anyhow::anyhow!("{}: {e}", c.display())))?;
                    mvm_superpeer::pki::serial_of(&text)
                        .map_err(|e| input(anyhow::anyhow!("{}: {e}", c.display())))?
                }
                (None, Some(s)) => hex::decode(s.trim_start_matches("0x"))
                    .ok()
                    .filter(|b| !b.is_empty() && b.len() <= 20)
                    .ok_or_else(|| {
                        input(anyhow::anyhow!(
                            "--serial '{s}': a serial number is 1 to 20 bytes of hex"
                        ))
                    })?,
                (None, None) => {
                    return Err(input(anyhow::anyhow!("give a certificate or --serial")));
                }
            };
            let r = authority.revoke(&ca, &serial).map_err(input)?;
            let file = ca.join(mvm_superpeer::pki::CRL_FILE);
            let what = if r.already {
                "was already revoked; written again"
            } else {
                "revoked"
            };
            println!(
                "serial {} {what}: {} is list {} ({} revoked)",
                hex::encode(&serial),
                file.display(),
                r.number,
                r.count
            );
            Ok(())
        }
        Which::Show { cert, trust } => {
            let t = trust_for(&cert, &trust)?;
            let p = mvm_superpeer::pki::read_principal(&cert, &t).map_err(|e| Failure {
                code: crate::exit::REFUSED,
                error: anyhow::anyhow!(e),
            })?;
            let serial = std::fs::read_to_string(&cert)
                .ok()
                .and_then(|t| mvm_superpeer::pki::serial_of(&t).ok())
                .map(hex::encode)
                .unwrap_or_default();
            println!("{p} (serial {serial})");
            Ok(())
        }
    }
}
