//! A component's repositories: validated (every value ends up in dnf's configuration), and
//! written as sections of the configuration a transaction runs with.

use nodekeeper_proto::v1::Repository;

/// A repository id: letters, digits and `. _ -`.
pub(super) fn repository(r: &Repository) -> Result<(), String> {
    let id_ok = !r.id.is_empty()
        && r.id.len() <= 100
        && r.id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !id_ok {
        return Err(format!("invalid repository id {:?}: letters, digits and . _ - only", r.id));
    }
    // Every value reaches dnf as one value of an INI line: no spaces, commas or control
    // characters (a newline would start another option).
    let plain = |v: &str| !v.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',');
    if r.base_url.is_empty() && r.mirrorlist.is_empty() && r.metalink.is_empty() {
        return Err(format!("repository {}: set base_url, mirrorlist or metalink", r.id));
    }
    let any = &["https://", "http://", "file:///"][..];
    for (what, url, schemes) in [
        ("base_url", &r.base_url, any),
        ("mirrorlist", &r.mirrorlist, any),
        ("metalink", &r.metalink, any),
        ("gpg_key_url", &r.gpg_key_url, any),
        ("proxy", &r.proxy, &["https://", "http://"]),
    ] {
        if url.is_empty() {
            continue;
        }
        if !schemes.iter().any(|s| url.starts_with(s)) || !plain(url) {
            return Err(format!(
                "repository {}: invalid {what} {url:?}: a {} URL without spaces or commas",
                r.id,
                schemes.join(" or ")
            ));
        }
    }
    for (what, path) in [
        ("ssl_ca_cert", &r.ssl_ca_cert),
        ("ssl_client_cert", &r.ssl_client_cert),
        ("ssl_client_key", &r.ssl_client_key),
    ] {
        if !path.is_empty() && (!path.starts_with('/') || !plain(path)) {
            return Err(format!("repository {}: {what} {path:?}: an absolute path without spaces or commas", r.id));
        }
    }
    if r.ssl_client_cert.is_empty() != r.ssl_client_key.is_empty() {
        return Err(format!("repository {}: ssl_client_cert and ssl_client_key go together", r.id));
    }
    if !(0..=99).contains(&r.priority) {
        return Err(format!("repository {}: priority {} is not within 1..99", r.id, r.priority));
    }
    for pattern in &r.exclude {
        let ok = !pattern.is_empty()
            && pattern.len() <= 100
            && pattern.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-' | '*' | '?'));
        if !ok {
            return Err(format!(
                "repository {}: exclude {pattern:?}: a package name pattern (letters, digits, . _ + - * ?)",
                r.id
            ));
        }
    }
    Ok(())
}

/// `r` as a section of dnf's configuration (its values validated by [`repository`]).
pub(super) fn repository_section(r: &Repository) -> String {
    let options = [
        ("name", format!("{} (nodekeeper component repository)", r.id)),
        ("baseurl", r.base_url.clone()),
        ("mirrorlist", r.mirrorlist.clone()),
        ("metalink", r.metalink.clone()),
        ("enabled", "1".into()),
        ("gpgcheck", if r.gpg_check { "1" } else { "0" }.into()),
        // The component's own repository must answer: an unreachable one is an error, not a
        // repository to skip silently (the node's repositories keep their own setting).
        ("skip_if_unavailable", "False".into()),
        ("gpgkey", r.gpg_key_url.clone()),
        ("priority", if r.priority == 0 { String::new() } else { r.priority.to_string() }),
        ("excludepkgs", r.exclude.join(",")),
        ("proxy", r.proxy.clone()),
        ("sslcacert", r.ssl_ca_cert.clone()),
        ("sslclientcert", r.ssl_client_cert.clone()),
        ("sslclientkey", r.ssl_client_key.clone()),
    ];
    let lines: String = options.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}={v}\n")).collect();
    format!("\n[{}]\n{lines}", r.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_validated() {
        let r = |id: &str, url: &str| Repository { id: id.into(), base_url: url.into(), ..Default::default() };
        repository(&r("nk", "file:///srv/repo")).unwrap();
        repository(&r("base-os", "https://mirror.example.com/el9/")).unwrap();
        assert!(repository(&r("a,b", "file:///srv")).is_err());
        assert!(repository(&r("nk", "ftp://x")).is_err());
        assert!(repository(&r("nk", "file:///srv/a,b")).is_err(), "a comma would split dnf's list of URLs");
        assert!(repository(&r("nk", "")).unwrap_err().contains("set base_url, mirrorlist or metalink"));
        let mirrors = Repository { id: "nk".into(), mirrorlist: "https://m.example/list".into(), ..Default::default() };
        repository(&mirrors).unwrap();
        let section = repository_section(&mirrors);
        assert!(section.starts_with("\n[nk]\n") && section.contains("mirrorlist=https://m.example/list\n"));
        assert!(!section.contains("baseurl="), "{section}");
        assert!(repository(&r("nk", "https://x/ y")).is_err());
    }
}
