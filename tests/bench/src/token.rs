//! The scopes the bench's bearer token carries, read from its payload (not verified:
//! the nodes do that), so a run that would only collect 403s stops before it starts.

use serde_json::Value;

/// Scopes each scenario needs: every scenario creates and seeds wallets through the API,
/// except balance-at, which seeds with SQL and only reads; reads does both.
pub fn required(scenario: &str) -> &'static [&'static str] {
    match scenario {
        "transfers" => &["wallets:create", "wallets:deposit", "transfers:write"],
        "holds" => &["wallets:create", "wallets:deposit", "holds:write"],
        "balance-at" => &["wallets:read"],
        "reads" => &["wallets:create", "wallets:deposit", "wallets:read"],
        _ => &["wallets:create", "wallets:deposit", "wallets:withdraw"],
    }
}

/// Every scope the bench may use; scripts/bench.sh mints its token with these.
pub const ALL: [&str; 7] = [
    "wallets:read",
    "wallets:create",
    "wallets:deposit",
    "wallets:withdraw",
    "wallets:admin",
    "transfers:write",
    "holds:write",
];

fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The token's scopes (`scope`, space separated, and `scp`, a string or a list), or
/// None when it is not a JWT whose payload can be read.
pub fn scopes(token: &str) -> Option<Vec<String>> {
    let payload = token.trim().split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&base64url(payload)?).ok()?;
    let mut out: Vec<String> = Vec::new();
    if let Some(s) = claims.get("scope").and_then(Value::as_str) {
        out.extend(s.split_whitespace().map(str::to_owned));
    }
    match claims.get("scp") {
        Some(Value::String(s)) => out.extend(s.split_whitespace().map(str::to_owned)),
        Some(Value::Array(a)) => out.extend(a.iter().filter_map(Value::as_str).map(str::to_owned)),
        _ => {}
    }
    Some(out)
}

/// The scopes `scenarios` need that `have` lacks, with the scenarios that need each.
pub fn missing(have: &[String], scenarios: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for s in scenarios {
        for need in required(s) {
            if have.iter().any(|h| h == need) {
                continue;
            }
            match out.iter_mut().find(|(scope, _)| scope == need) {
                Some((_, who)) => who.push(s.clone()),
                None => out.push(((*need).to_owned(), vec![s.clone()])),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut s = String::new();
        for chunk in claims.as_bytes().chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for k in 0..=chunk.len() {
                s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            }
        }
        format!("eyJhbGciOiJFUzI1NiJ9.{s}.sig")
    }

    #[test]
    fn reads_scope_and_scp() {
        let t =
            jwt(r#"{"sub":"dev","scope":"wallets:read transfers:write","scp":["holds:write"]}"#);
        assert_eq!(
            scopes(&t).expect("scopes"),
            ["wallets:read", "transfers:write", "holds:write"]
        );
        assert_eq!(scopes("not a token"), None);
        assert_eq!(scopes(&jwt(r#"{"sub":"x"}"#)), Some(vec![]));
    }

    #[test]
    fn names_what_is_missing_for_whom() {
        let have: Vec<String> = ["wallets:create", "wallets:deposit", "wallets:withdraw"]
            .map(str::to_owned)
            .to_vec();
        let names: Vec<String> = ["constant", "transfers", "holds", "balance-at", "reads"]
            .map(str::to_owned)
            .to_vec();
        let m = missing(&have, &names);
        let scopes: Vec<&str> = m.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(scopes, ["transfers:write", "holds:write", "wallets:read"]);
        assert_eq!(m[2].1, ["balance-at", "reads"]);
        assert!(missing(&ALL.map(str::to_owned), &names).is_empty());
    }
}
