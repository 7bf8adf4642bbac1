//! `mvm image`: a node's repository of execution-environment images (OpenCCS), the one
//! `mvm node --os-dir DIR` offers and makes guests from.

use std::path::PathBuf;

use clap::Subcommand;
use mvm_os::image::{ImageError, ImageId, Metadata, Repository};
use serde::Serialize;

use super::print;
use crate::OutputArg;
use crate::exit::{Failure, input};

/// Arguments of `mvm image`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The node's OS-layer directory (the repository is its `images/`).
    #[arg(
        long,
        value_name = "DIR",
        global = true,
        default_value = "/var/lib/mvm/os"
    )]
    os_dir: PathBuf,
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Import FILE as image NAME:VERSION; prints its id (`NAME:VERSION@sha256:HEX`).
    Import {
        /// `name:version`.
        name: String,
        /// The image's bytes.
        file: PathBuf,
        /// How the bytes are stored: raw, raw+zstd (decompressed at deploy) or qcow2.
        #[arg(long, default_value = "raw")]
        format: String,
        /// The drivers that can run it (comma-separated: host, xen).
        #[arg(long, value_delimiter = ',', default_value = "host,xen")]
        drivers: Vec<String>,
        /// Operating system.
        #[arg(long, default_value = "linux")]
        os: String,
        /// Architecture.
        #[arg(long, default_value = std::env::consts::ARCH)]
        arch: String,
        /// The id of the kernel image it boots (Xen PV/PVH).
        #[arg(long, value_name = "ID")]
        kernel: Option<String>,
        /// The id of the ramdisk image it boots with.
        #[arg(long, value_name = "ID")]
        ramdisk: Option<String>,
        /// The kernel command line it needs.
        #[arg(long)]
        cmdline: Option<String>,
        /// Its guest boots an MVM agent (`mvm agent`) that runs the job parts placed in it
        /// (Xen); the node gives the guest an interface on its guest network.
        #[arg(long)]
        agent: bool,
        #[command(flatten)]
        out: OutputArg,
    },
    /// List the images (the ids the node offers).
    List {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Fetch image ID (`name:version@sha256:HEX`) from another node, `/…/p2p/PEER`; the bytes
    /// are kept only if they hash to the id.
    Fetch {
        /// The node to fetch from.
        #[arg(long, value_name = "MULTIADDR")]
        from: String,
        /// The image's full id.
        id: String,
        /// Whose identity to ask with (a node's state directory, or a user's from `mvm ca
        /// issue`); the serving node's policy decides `use-image` for it.
        #[command(flatten)]
        who: crate::cmd::job::IdentityArg,
    },
    /// Re-hash an image's bytes against its id.
    Verify {
        /// `name:version@sha256:HEX` or `name:version`.
        id: String,
    },
}

#[derive(Serialize)]
struct Row {
    id: String,
    size: u64,
    format: String,
    drivers: Vec<String>,
    os: String,
    arch: String,
}

fn resolve(repo: &Repository, id: &str) -> Result<ImageId, ImageError> {
    if id.contains("@sha256:") {
        id.parse()
    } else {
        let (n, v) = id
            .split_once(':')
            .ok_or_else(|| ImageError::BadId(id.to_owned()))?;
        repo.resolve(n, v)
    }
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let dir = args.os_dir.join("images");
    let repo = Repository::open(&dir).map_err(input)?;
    match args.which {
        Which::Import {
            name,
            file,
            format,
            drivers,
            os,
            arch,
            kernel,
            ramdisk,
            cmdline,
            agent,
            out,
        } => {
            let (n, v) = name
                .split_once(':')
                .ok_or_else(|| input(format!("'{name}': write the image name as NAME:VERSION")))?;
            // Boot images must be in the repository already, by full id.
            for id in kernel.iter().chain(&ramdisk) {
                let id = resolve(&repo, id).map_err(input)?;
                repo.get(&id).map_err(input)?;
            }
            let canon = |x: Option<String>| -> Result<Option<String>, Failure> {
                x.map(|i| resolve(&repo, &i).map(|id| id.to_string()))
                    .transpose()
                    .map_err(input)
            };
            let metadata = Metadata {
                os,
                arch,
                kernel: canon(kernel)?,
                ramdisk: canon(ramdisk)?,
                cmdline,
                agent,
                drivers,
                format,
            };
            let id = repo
                .import(n, v, &file, metadata)
                .map_err(|e| input(format!("{}: {e}", file.display())))?;
            print(&id.to_string(), out.output, Clone::clone)
        }
        Which::List { out } => {
            let rows: Vec<Row> = repo
                .list()
                .map_err(input)?
                .into_iter()
                .map(|i| Row {
                    id: i.id.to_string(),
                    size: i.size,
                    format: i.metadata.format,
                    drivers: i.metadata.drivers,
                    os: i.metadata.os,
                    arch: i.metadata.arch,
                })
                .collect();
            print(&rows, out.output, |rows| {
                if rows.is_empty() {
                    return format!("no images in {}", dir.display());
                }
                rows.iter()
                    .map(|r| {
                        format!(
                            "{}  {} B  {}  {}/{}  drivers {}",
                            r.id,
                            r.size,
                            r.format,
                            r.os,
                            r.arch,
                            r.drivers.join(",")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        Which::Fetch { from, id, who } => {
            let id: ImageId = id.parse().map_err(input)?;
            let creds = who.credentials()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(Failure::failed)?;
            let image = rt
                .block_on(mvm_superpeer::client::fetch_image(
                    &creds, &from, &id, &repo,
                ))
                .map_err(crate::cmd::job::wire)?;
            println!("{} ({} B)", image.id, image.size);
            Ok(())
        }
        Which::Verify { id } => {
            let id = resolve(&repo, &id).map_err(input)?;
            match repo.verify(&id) {
                Ok(()) => {
                    println!("{id}: ok");
                    Ok(())
                }
                Err(e @ ImageError::Corrupt { .. }) => Err(Failure::failed(anyhow::anyhow!(e))),
                Err(e) => Err(input(e)),
            }
        }
    }
}
