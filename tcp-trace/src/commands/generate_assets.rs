//! `tcp-trace generate-assets DIR` (hidden): the man pages and shell
//! completions a package installs, made from the flags' own definitions, so
//! that every subcommand has them without a list to keep in step.
//!
//! DIR/man holds `tcp-trace.1` and one `tcp-trace-SUBCOMMAND.1` per visible
//! subcommand; DIR/completions holds `tcp-trace.bash`, `_tcp-trace` (zsh) and
//! `tcp-trace.fish`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use clap_complete::{Generator as _, Shell};

use crate::cli::{Cli, BIN_NAME};

const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

pub fn run(dir: &Path) -> Result<()> {
    let man = fresh_dir(dir.join("man"))?;
    let completions = fresh_dir(dir.join("completions"))?;
    // clap_mangen leaves hidden subcommands out by itself.
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    let mut shown = without_hidden_subcommands(Cli::command());
    for shell in SHELLS {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut shown, BIN_NAME, &mut script);
        let mut script =
            String::from_utf8(script).context("a completion script that is not UTF-8")?;
        if shell == Shell::Bash {
            script = fix_bash_subcommand_states(&script);
        }
        let path = completions.join(shell.file_name(BIN_NAME));
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// clap_complete 4.6's bash script spells a subcommand's state one way where
/// it reads the command line (`tcp__trace__subcmd__watch`) and another where
/// it completes (`tcp__subcmd__trace__subcmd__watch`) when the program's name
/// has a hyphen, so nothing after a subcommand completes (clap issue 6421).
/// This spells the second like the first; once clap is fixed it changes
/// nothing.
fn fix_bash_subcommand_states(script: &str) -> String {
    let broken = format!("{}__subcmd__", BIN_NAME.replace('-', "__subcmd__"));
    let fixed = format!("{}__subcmd__", BIN_NAME.replace('-', "__"));
    script.replace(&broken, &fixed)
}

/// An empty `path`: a page left from a subcommand that is gone would
/// otherwise be packaged with the rest.
fn fresh_dir(path: PathBuf) -> Result<PathBuf> {
    match fs::remove_dir_all(&path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("emptying {}", path.display()));
        }
        _ => {}
    }
    fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}

/// `full` less its hidden subcommands, which the completion generators would
/// offer (clap cannot remove a subcommand, so the command is built again from
/// its arguments and visible subcommands; the top level's help text is not
/// part of any completion).
fn without_hidden_subcommands(full: clap::Command) -> clap::Command {
    clap::Command::new(BIN_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, process};

    use super::*;

    /// A scratch directory of this test's own, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("tcp-trace-{test}-{}", process::id()));
            let _ = fs::remove_dir_all(&dir);
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn visible_subcommands() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_owned())
            .collect()
    }

    fn file_names(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    #[test]
    fn one_man_page_per_visible_subcommand_and_no_stale_ones() {
        let scratch = Scratch::new("man");
        let man = scratch.0.join("man");
        fs::create_dir_all(&man).unwrap();
        fs::write(man.join("tcp-trace-gone.1"), "a removed subcommand's page").unwrap();

        run(&scratch.0).unwrap();

        let mut expected: BTreeSet<String> = visible_subcommands()
            .iter()
            .map(|name| format!("tcp-trace-{name}.1"))
            .collect();
        expected.insert("tcp-trace.1".to_owned());
        assert!(expected.contains("tcp-trace-watch.1"), "{expected:?}");
        assert!(
            !expected.contains("tcp-trace-bench-floor.1"),
            "{expected:?}"
        );
        assert_eq!(file_names(&man), expected);
        let watch = fs::read_to_string(man.join("tcp-trace-watch.1")).unwrap();
        assert!(watch.contains("\\-\\-ring\\-bytes"), "{watch}");
    }

    #[test]
    fn completions_offer_the_visible_subcommands_only() {
        let scratch = Scratch::new("completions");
        run(&scratch.0).unwrap();

        let completions = scratch.0.join("completions");
        let expected = ["tcp-trace.bash", "_tcp-trace", "tcp-trace.fish"].map(String::from);
        assert_eq!(file_names(&completions), BTreeSet::from(expected.clone()));
        for file in expected {
            let script = fs::read_to_string(completions.join(&file)).unwrap();
            for name in visible_subcommands() {
                assert!(script.contains(&name), "{file} lacks {name}");
            }
            for hidden in ["bench-floor", "generate-assets"] {
                assert!(!script.contains(hidden), "{file} offers {hidden}");
            }
            assert!(
                script.contains("ring-bytes"),
                "{file} lacks the tracing flags"
            );
        }
    }

    /// Completes `tcp-trace WORDS…` with the generated bash script, in bash.
    fn bash_completes(script: &Path, words: &str) -> Vec<String> {
        let out = process::Command::new("bash")
            .arg("-c")
            .arg(
                r#"source "$0"; COMP_WORDS=(tcp-trace $1); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
                _tcp__trace tcp-trace "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
                printf '%s\n' "${COMPREPLY[@]}""#,
            )
            .arg(script)
            .arg(words)
            .output()
            .expect("running bash");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn bash_completes_subcommands_and_their_flags() {
        let scratch = Scratch::new("bash");
        run(&scratch.0).unwrap();
        let script = scratch.0.join("completions/tcp-trace.bash");

        assert_eq!(bash_completes(&script, "wat"), ["watch"]);
        assert_eq!(bash_completes(&script, "watch --ri"), ["--ring-bytes"]);
        assert_eq!(bash_completes(&script, "stats --in"), ["--interval"]);
    }
}
