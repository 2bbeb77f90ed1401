//! Where a webhook may go (SSRF defence): `http`/`https` only, public addresses only unless the
//! host is listed in `webhooks.allowed_hosts`, and a name is resolved once, by
//! [`VettedResolver`], whose vetted addresses are the ones the client connects to, so a DNS
//! answer that changes between the check and the connection (rebinding) cannot slip through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_documentation()
        || v4.is_multicast()
        || a == 0 // "this network"
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64/10
        || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18/15
        || a >= 240) // reserved
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    // Addresses that embed or translate to an IPv4 address reach whatever that address reaches
    // (often the host itself or the metadata service): refused whatever they embed.
    let embeds_v4 = v6.to_ipv4_mapped().is_some()
        || s[..6] == [0; 6] // IPv4-compatible (deprecated), also :: and ::1
        || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 64:ff9b::/96 and 64:ff9b:1::/48
        || s[0] == 0x2002 // 6to4
        || (s[0] == 0x2001 && s[1] == 0); // Teredo
    !(embeds_v4
        || v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0100 && s[1..4] == [0; 3])) // discard-only 100::/64
}

/// Whether `ip` is a public unicast address a webhook may reach without being listed.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

/// The URL's host without IPv6 brackets, as `allowed_hosts` lists it.
fn bare_host(url: &url::Url) -> Option<String> {
    url.host_str()
        .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
}

fn is_listed(host: &str, allowed_hosts: &[String]) -> bool {
    allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
}

/// Whether `url` may receive webhooks: `http`/`https` only; with `allowed_hosts` empty, any
/// public host; otherwise only the listed hosts. Loopback, private, link-local and every
/// address that embeds an IPv4 address only when listed. A name is checked again, for what it
/// resolves to, when the delivery connects ([`VettedResolver`]).
///
/// # Errors
/// A sentence saying why not.
pub fn validate_url(url: &str, allowed_hosts: &[String]) -> Result<url::Url, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme `{}` is not allowed (http or https only)",
            parsed.scheme()
        ));
    }
    let host = bare_host(&parsed).ok_or("has no host")?;
    let listed = is_listed(&host, allowed_hosts);
    if !allowed_hosts.is_empty() && !listed {
        return Err(format!("host `{host}` is not in webhooks.allowed_hosts"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        if !is_public(ip) && !listed {
            return Err(format!(
                "address {ip} is not public; list it in webhooks.allowed_hosts to allow it"
            ));
        }
    } else if (host == "localhost" || host.ends_with(".localhost")) && !listed {
        return Err("localhost is not allowed unless listed in webhooks.allowed_hosts".to_owned());
    }
    Ok(parsed)
}

/// A URL as logs may show it: scheme, host, port and path; never the query or the userinfo,
/// which often carry tokens.
pub fn loggable(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.path()
            )
        }
        Err(_) => "[not a URL]".to_owned(),
    }
}

/// The webhook client's DNS: resolves a name once and hands the client only addresses that
/// passed [`is_public`] (any address for a listed host). A name with one non-public address is
/// refused whole: it is somebody's way in.
#[derive(Debug, Clone)]
pub struct VettedResolver {
    allowed_hosts: Arc<Vec<String>>,
}

impl VettedResolver {
    /// A resolver that lets listed hosts resolve to anything.
    pub fn new(allowed_hosts: &[String]) -> Self {
        Self {
            allowed_hosts: Arc::new(allowed_hosts.to_vec()),
        }
    }

    /// Resolves `host` and vets the answer.
    ///
    /// # Errors
    /// A sentence: the name does not resolve, or resolves to a non-public address.
    pub async fn vetted(&self, host: &str) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        if !is_listed(host, &self.allowed_hosts) {
            if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(format!(
                    "{host} resolves to non-public address {}",
                    bad.ip()
                ));
            }
        }
        if addrs.is_empty() {
            return Err(format!("{host} has no address"));
        }
        Ok(addrs)
    }
}

impl Resolve for VettedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addrs = this.vetted(name.as_str()).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(validate_url("https://example.com/hook", &[]).is_ok());
        assert!(validate_url("https://93.184.215.14/hook", &[]).is_ok());
        assert!(validate_url("https://[2606:4700::1111]/hook", &[]).is_ok());
        assert!(validate_url("ftp://example.com/hook", &[]).is_err());
        assert!(validate_url("http://127.0.0.1:9000/hook", &[]).is_err());
        assert!(validate_url("http://10.1.2.3/hook", &[]).is_err());
        assert!(validate_url("http://169.254.169.254/latest", &[]).is_err());
        assert!(validate_url("http://[::1]:9000/hook", &[]).is_err());
        assert!(validate_url("http://localhost:9000/hook", &[]).is_err());
        let allowed = vec!["127.0.0.1".to_owned()];
        assert!(validate_url("http://127.0.0.1:9000/hook", &allowed).is_ok());
        assert!(validate_url("https://example.com/hook", &allowed).is_err());
        let v6_listed = vec!["::1".to_owned()];
        assert!(validate_url("http://[::1]:9000/hook", &v6_listed).is_ok());
    }

    #[test]
    fn addresses_that_embed_or_translate_to_ipv4_are_refused() {
        for refused in [
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::",
            "2001:db8::1",
            "100::1",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(!is_public(ip), "{refused} must be refused");
            let url = format!("http://[{refused}]/hook");
            assert!(validate_url(&url, &[]).is_err(), "{url}");
        }
        for refused in [
            "100.64.0.1",
            "100.127.255.254",
            "0.1.2.3",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "172.16.0.1",
            "192.168.1.1",
        ] {
            assert!(!is_public(refused.parse().unwrap()), "{refused}");
        }
        for public in ["8.8.8.8", "100.128.0.1", "2606:4700::1111", "2a00:1450::1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn logs_never_show_query_or_userinfo() {
        assert_eq!(
            loggable("https://user:pw@hooks.example.com:8443/in/abc?token=s3cret#x"),
            "https://hooks.example.com:8443/in/abc"
        );
        assert_eq!(loggable("not a url ?token=s3cret"), "[not a URL]");
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_unless_listed() {
        let resolver = VettedResolver::new(&[]);
        let refused = resolver.vetted("localhost").await.unwrap_err();
        assert!(refused.contains("non-public"), "{refused}");
        let listed = VettedResolver::new(&["localhost".to_owned()]);
        assert!(!listed.vetted("localhost").await.unwrap().is_empty());
    }
}
