//! Host names: the templates a group names its members with, and the check
//! every name passes before the server sends it and before the agent writes
//! it into a deployed system.

use anyhow::{Result, bail};

/// Longest template accepted (the rendered name is bounded separately).
const MAX_TEMPLATE: usize = 128;

/// Checks that `name` is one RFC 1123 label: 1 to 63 letters, digits and
/// hyphens, not starting or ending with a hyphen; at most 15 characters
/// when the system is Windows (the NetBIOS limit of its ComputerName).
pub fn check(name: &str, windows: bool) -> Result<()> {
    let max = if windows { 15 } else { 63 };
    if name.is_empty() {
        bail!("the host name is empty");
    }
    if name.len() > max {
        bail!(
            "host name {name:?} has {} characters; at most {max}{}",
            name.len(),
            if windows {
                " for a Windows image (NetBIOS)"
            } else {
                ""
            }
        );
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        bail!("host name {name:?} holds {c:?}: only letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        bail!("host name {name:?} starts or ends with '-'");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        bail!("host name {name:?} is all digits");
    }
    Ok(())
}

/// Renders a group's template for one member: `{slot}` or `{slot:0N}` (the
/// member's 1-based position in the group), `{mac}` (12 hex digits) and
/// `{group}`.
pub fn render(template: &str, slot: u32, mac: &str, group: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        if rest[i..].starts_with('}') {
            bail!("host name template {template:?}: '}}' without '{{'");
        }
        let Some(end) = rest[i..].find('}') else {
            bail!("host name template {template:?}: '{{' without '}}'");
        };
        let field = &rest[i + 1..i + end];
        match field.split_once(':') {
            None if field == "slot" => out.push_str(&slot.to_string()),
            None if field == "mac" => out.extend(mac.chars().filter(|c| *c != ':')),
            None if field == "group" => out.push_str(group),
            Some(("slot", w)) => {
                let width = w
                    .strip_prefix('0')
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| (1..=9).contains(n));
                let Some(width) = width else {
                    bail!(
                        "host name template {template:?}: {{slot:{w}}} is not a width \
                         such as {{slot:02}}"
                    );
                };
                out.push_str(&format!("{slot:0width$}"));
            }
            _ => bail!(
                "host name template {template:?}: unknown field {{{field}}} \
                 (known: {{slot}}, {{slot:02}}, {{mac}}, {{group}})"
            ),
        }
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks a template when it is set: its fields, and that it renders to a
/// valid name (slot 1 and slot 999 stand for the members).
pub fn check_template(template: &str, group: &str) -> Result<()> {
    if template.len() > MAX_TEMPLATE {
        bail!("host name template is over {MAX_TEMPLATE} characters");
    }
    for slot in [1, 999] {
        let name = render(template, slot, "52:54:00:00:00:01", group)?;
        check(&name, false).map_err(|e| anyhow::anyhow!("host name template {template:?}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields() {
        let n = render("lab12-{slot:02}", 3, "52:54:00:ab:cd:ef", "room").unwrap();
        assert_eq!(n, "lab12-03");
        let n = render("{group}-{mac}-{slot}", 12, "52:54:00:ab:cd:ef", "r1").unwrap();
        assert_eq!(n, "r1-525400abcdef-12");
    }

    #[test]
    fn refuses_bad_templates_and_names() {
        let e = |t: &str| format!("{:#}", check_template(t, "g").unwrap_err());
        assert!(e("lab-{slot").contains("without '}'"), "{}", e("lab-{slot"));
        assert!(e("lab-{host}").contains("unknown field {host}"));
        assert!(e("lab-{slot:x2}").contains("not a width"));
        assert!(e("lab_{slot}").contains("holds '_'"));
        assert!(e("-{slot}").contains("starts or ends"));
        assert!(check_template("lab12-{slot:02}", "g").is_ok());
        let e = format!("{:#}", check("averyverylongname", true).unwrap_err());
        assert!(e.contains("at most 15") && e.contains("NetBIOS"), "{e}");
        assert!(check("averyverylongname", false).is_ok());
        assert!(check(&"a".repeat(64), false).is_err());
        assert!(check("123", false).is_err());
    }
}
