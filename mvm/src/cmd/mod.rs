//! One module per subcommand, and the printing they share.

use crate::Output;
use crate::exit::Failure;

pub(crate) mod agree;
pub(crate) mod array;
pub(crate) mod bank;
pub(crate) mod bench;
pub(crate) mod ca;
pub(crate) mod daemon;
pub(crate) mod env;
pub(crate) mod files;
pub(crate) mod image;
pub(crate) mod job;
pub(crate) mod lab;
pub(crate) mod logs;
pub(crate) mod market;
pub(crate) mod policy;
pub(crate) mod run;
pub(crate) mod top;
pub(crate) mod topology;
pub(crate) mod trigger;

/// Prints a report as JSON or as text.
pub(crate) fn print<T: serde::Serialize>(
    value: &T,
    output: Output,
    text: impl Fn(&T) -> String,
) -> Result<(), Failure> {
    match output {
        Output::Json => {
            let s = serde_json::to_string_pretty(value).map_err(Failure::failed)?;
            println!("{s}");
        }
        Output::Text => println!("{}", text(value)),
    }
    Ok(())
}
