//! Any other storage, through the operator's own commands: `list` prints the entries one per
//! line, `add` and `remove` take the entry where their argv says `{entry}`. No shell is involved.

use std::collections::BTreeSet;

pub struct Command {
    pub list: Vec<String>,
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

impl Command {
    pub async fn list(&self) -> Result<BTreeSet<String>, String> {
        let out = super::run(self.list[0].as_ref(), &self.list[1..]).await?;
        Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
    }

    pub async fn run(&self, argv: &[String], entry: &str) -> Result<(), String> {
        let args: Vec<String> =
            argv[1..].iter().map(|a| if a == "{entry}" { entry.to_owned() } else { a.clone() }).collect();
        super::run(argv[0].as_ref(), &args).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_entry_is_one_argument_and_never_reaches_a_shell_of_ours() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list");
        std::fs::write(&list, "10.0.0.1\n\n10.0.0.2\n").unwrap();
        let l = list.display().to_string();
        // The operator's script, here a shell one: it gets the entry as $0, whatever it holds.
        let c = Command {
            list: vec!["cat".into(), l.clone()],
            add: vec!["sh".into(), "-c".into(), format!("printf '%s\\n' \"$0\" >> {l}"), "{entry}".into()],
            remove: vec!["false".into(), "{entry}".into()],
        };
        assert_eq!(c.list().await.unwrap().into_iter().collect::<Vec<_>>(), ["10.0.0.1", "10.0.0.2"]);
        c.run(&c.add, "10.0.0.3; touch /tmp/nodekeeper-pwned").await.unwrap();
        assert!(c.list().await.unwrap().contains("10.0.0.3; touch /tmp/nodekeeper-pwned"));
        assert!(!std::path::Path::new("/tmp/nodekeeper-pwned").exists());
        let e = c.run(&c.remove, "10.0.0.1").await.unwrap_err();
        assert!(e.contains("false 10.0.0.1 failed"), "{e}");
    }
}
