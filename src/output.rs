//! Output formats of the operator CLI: `-o table` (for people; the default) and
//! `-o json` (for scripts), the same flag on every command that prints a result.
//!
//! Owns: the `-o/--output` flag ([`OutputArgs`], [`OutputFormat`]) and how a result is
//! encoded as JSON ([`to_json`]: pretty, one trailing newline). Must not: define any
//! command's JSON schema (each command's module owns its `#[derive(Serialize)]` type;
//! all of them are documented in docs/cli-output.md), render tables, or change an
//! exit code (a command exits the same in both formats).

use serde::Serialize;

/// What a command prints on stdout.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Text for people (also `text`, the older name in `meduza commit -o text`).
    #[default]
    #[value(alias = "text")]
    Table,
    /// One JSON document (schemas: docs/cli-output.md).
    Json,
}

/// The `-o/--output` flag; flatten it into a command's arguments. Global, so that a
/// command with subcommands (`meduza dataplane show -o json`) takes it after them.
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutputArgs {
    /// Output format: `table` for people, `json` for scripts (docs/cli-output.md).
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        value_name = "FORMAT",
        default_value_t = OutputFormat::Table,
        global = true
    )]
    pub output: OutputFormat,
    /// `-o json` under its older spelling (`meduza status --json`,
    /// `meduza fleet nodes --json`), kept for scripts written against it.
    #[arg(long, hide = true, global = true)]
    pub json: bool,
}

impl OutputArgs {
    /// The format asked for: `--json` wins over `-o`.
    pub fn format(&self) -> OutputFormat {
        if self.json {
            OutputFormat::Json
        } else {
            self.output
        }
    }

    /// Whether JSON was asked for.
    pub fn is_json(&self) -> bool {
        self.format() == OutputFormat::Json
    }
}

impl From<OutputFormat> for OutputArgs {
    fn from(output: OutputFormat) -> Self {
        Self {
            output,
            json: false,
        }
    }
}

/// `value` as pretty JSON with a trailing newline, ready for `print!`.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    match serde_json::to_string_pretty(value) {
        Ok(mut text) => {
            text.push('\n');
            text
        }
        // serde_json fails only on a map with non-string keys or a failing custom
        // `Serialize`, which no schema here has. Should one appear, scripts still get
        // a JSON document naming the cause rather than nothing.
        Err(err) => {
            tracing::error!(%err, "cannot encode the output as JSON");
            let doc =
                serde_json::json!({ "error": format!("cannot encode the output as JSON: {err}") });
            format!("{doc}\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        output: OutputArgs,
    }

    fn parse(args: &[&str]) -> OutputFormat {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .expect("parses")
            .output
            .format()
    }

    #[test]
    fn table_is_the_default_and_json_has_three_spellings() {
        assert_eq!(parse(&[]), OutputFormat::Table);
        assert_eq!(parse(&["-o", "table"]), OutputFormat::Table);
        assert_eq!(parse(&["-o", "text"]), OutputFormat::Table);
        assert_eq!(parse(&["-o", "json"]), OutputFormat::Json);
        assert_eq!(parse(&["--output=json"]), OutputFormat::Json);
        assert_eq!(parse(&["--json"]), OutputFormat::Json);
        assert!(Cli::try_parse_from(["x", "-o", "yaml"]).is_err());
    }

    #[test]
    fn json_is_pretty_with_one_trailing_newline() {
        #[derive(Serialize)]
        struct S {
            key: &'static str,
        }
        let text = to_json(&S {
            key: "/nodes/a/lan",
        });
        assert_eq!(text, "{\n  \"key\": \"/nodes/a/lan\"\n}\n");
    }

    #[test]
    fn an_unencodable_value_still_prints_a_json_error() {
        let mut m = std::collections::BTreeMap::new();
        m.insert((1, 2), "x");
        let v: serde_json::Value = serde_json::from_str(&to_json(&m)).expect("valid JSON");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("JSON")),
            "{v}"
        );
    }
}
