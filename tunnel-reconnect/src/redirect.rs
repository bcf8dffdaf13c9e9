//! Which hub-supplied endpoints an agent follows.
//!
//! A draining hub may name other hubs in its `close` message (`reconnect.endpoints`).
//! The agent sends its credentials to whatever it dials, so it follows such a hint only
//! to endpoints its own configuration allows, never from `wss` to `ws`, and keeps its
//! own endpoints after the hinted ones, so that it falls back to them if those fail.

/// Which endpoints named by a draining hub an agent dials.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Redirects {
    /// Never: the agent stays with its own endpoints (a pool's members, pinned to
    /// their hubs, use this).
    Never,
    /// Only endpoints that are in the agent's own list (the default): the hint
    /// chooses among them.
    #[default]
    Listed,
    /// Endpoints in the agent's own list, and any endpoint of these origins
    /// (`scheme://host[:port]`, for example `wss://hub-2.example:7070`).
    Origins(Vec<String>),
}

/// The origin of a hub URL: scheme and authority, lower case, with the default port
/// made explicit. `None` for anything but a plain `ws://` or `wss://` URL (user
/// information in the authority is refused: it would carry credentials).
pub(crate) fn origin(url: &str) -> Option<(bool, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "ws" => false,
        "wss" => true,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?.to_ascii_lowercase();
    if authority.is_empty() || authority.contains('@') || authority.chars().any(char::is_whitespace)
    {
        return None;
    }
    let has_port = match authority.rfind(':') {
        // An IPv6 literal without a port ends with `]`.
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let authority = if has_port {
        authority
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    Some((tls, authority))
}

impl Redirects {
    /// The endpoints to dial after a hint naming `hinted`, while connected to
    /// `current`: the allowed hinted ones first, then the agent's `own` endpoints not
    /// already among them. Also returns the hinted endpoints that were refused.
    pub fn follow(
        &self,
        own: &[String],
        current: &str,
        hinted: &[String],
    ) -> (Vec<String>, Vec<String>) {
        let secure = origin(current).is_some_and(|(tls, _)| tls);
        let mut dial = Vec::new();
        let mut refused = Vec::new();
        for url in hinted {
            let allowed = match origin(url) {
                None => false,
                // Never trade TLS for plain text.
                Some((false, _)) if secure => false,
                Some((_, authority)) => match self {
                    Redirects::Never => false,
                    Redirects::Listed => own.contains(url),
                    Redirects::Origins(origins) => {
                        own.contains(url)
                            || origins.iter().any(|o| {
                                origin(o).is_some_and(|(tls, a)| {
                                    a == authority && Some(tls) == origin(url).map(|(t, _)| t)
                                })
                            })
                    }
                },
            };
            if allowed && !dial.contains(url) {
                dial.push(url.clone());
            } else if !allowed {
                refused.push(url.clone());
            }
        }
        if dial.is_empty() {
            return (own.to_vec(), refused);
        }
        for url in own {
            if !dial.contains(url) {
                dial.push(url.clone());
            }
        }
        (dial, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn origins_are_normalized_and_odd_urls_refused() {
        assert_eq!(
            origin("wss://Hub.Example/x"),
            Some((true, "hub.example:443".into()))
        );
        assert_eq!(
            origin("ws://127.0.0.1:7070/"),
            Some((false, "127.0.0.1:7070".into()))
        );
        assert_eq!(origin("ws://[::1]/"), Some((false, "[::1]:80".into())));
        assert_eq!(origin("ws://[::1]:9/"), Some((false, "[::1]:9".into())));
        assert_eq!(origin("ws://user:pw@evil/"), None);
        assert_eq!(origin("http://hub/"), None);
        assert_eq!(origin("ws:///"), None);
    }

    #[test]
    fn hints_are_followed_only_where_the_configuration_allows() {
        let own = urls(&["wss://a:1/", "wss://b:1/"]);
        // Listed: only own endpoints, hinted first, the rest after them.
        let (dial, refused) =
            Redirects::Listed.follow(&own, "wss://a:1/", &urls(&["wss://b:1/", "wss://evil:1/"]));
        assert_eq!(dial, urls(&["wss://b:1/", "wss://a:1/"]));
        assert_eq!(refused, urls(&["wss://evil:1/"]));
        // Nothing allowed: the agent's own list.
        let (dial, _) = Redirects::Listed.follow(&own, "wss://a:1/", &urls(&["wss://evil:1/"]));
        assert_eq!(dial, own);
        // An allowed origin, but never from wss to ws.
        let allow = Redirects::Origins(urls(&["wss://c:1", "ws://c:2"]));
        let (dial, refused) = allow.follow(
            &own,
            "wss://a:1/",
            &urls(&["ws://c:2/", "wss://c:1/x", "wss://c:9/"]),
        );
        assert_eq!(dial, urls(&["wss://c:1/x", "wss://a:1/", "wss://b:1/"]));
        assert_eq!(refused, urls(&["ws://c:2/", "wss://c:9/"]));
        // Never.
        let (dial, refused) = Redirects::Never.follow(&own, "wss://a:1/", &urls(&["wss://b:1/"]));
        assert_eq!((dial, refused.len()), (own.clone(), 1));
    }
}
