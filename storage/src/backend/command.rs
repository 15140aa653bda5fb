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
