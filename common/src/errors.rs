//! Errors as an operator reads them in a log line or a CLI message.

/// An error and its causes on one line, each cause once ("error performing TLS handshake" or
/// "error sending request" alone say little; some errors repeat their cause in their own text).
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_follow_once() {
        let inner = std::io::Error::other("connection refused");
        let outer = std::io::Error::other(inner);
        // io::Error::other's text is its cause's: said once.
        assert_eq!(chain(&outer), "connection refused");
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error performing TLS handshake")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Wrap(std::io::Error::other("invalid peer certificate: UnknownIssuer"));
        assert_eq!(chain(&e), "error performing TLS handshake: invalid peer certificate: UnknownIssuer");
    }
}
