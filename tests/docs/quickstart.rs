//! The front page's two command blocks ("A single node in five commands", "A two-node
//! fleet in five more") run as written, on their default addresses, inside a network
//! namespace of their own (so 127.0.0.1:7070-7072 are free and nothing else sees them).

/// The commands of the `sh` block under the heading `heading` of `readme`, each without
/// its comment.
pub fn block_under(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .find(&format!("## {heading}"))
        .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
    let rest = &readme[start..];
    let open = rest.find("```sh\n").expect("a sh block under the heading") + "```sh\n".len();
    let close = rest[open..].find("```").expect("the block ends") + open;
    rest[open..close]
        .lines()
        .map(|line| match line.find(" #") {
            Some(at) => line[..at].trim_end().to_string(),
            None => line.trim_end().to_string(),
        })
        .filter(|line| !line.is_empty())
        .collect()
}

/// The HTTP port a backgrounded `lazyblk store` or `lazyblk daemon` line listens on.
fn port_of(command: &str) -> u16 {
    let words: Vec<&str> = command.split_whitespace().collect();
    if let Some(i) = words.iter().position(|w| *w == "--listen") {
        let addr = words.get(i + 1).expect("--listen ADDR");
        return addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port");
    }
    if words.get(1) == Some(&"store") {
        7070
    } else {
        7071
    }
}

/// A bash script that runs `single` then `fleet` as a user would: each background
/// server waited for (its /healthz), the single node's daemon stopped before the fleet
/// block (as the page says), and the commands whose answer comes with a heartbeat
/// (`nodes`, `status --fleet`) asked again until it does (bounded). Each command's
/// output is framed by `+ COMMAND` lines.
pub fn script(single: &[String], fleet: &[String]) -> String {
    let mut s = String::from(
        "set -m\nset -u\nip link set lo up\n\
         wait_http() { for _ in $(seq 300); do curl -sf \"$1\" >/dev/null && return 0; sleep 0.1; done; echo \"no answer from $1\"; exit 1; }\n\
         retry() { for _ in $(seq 120); do out=$(\"$@\" 2>&1); if printf '%s\\n' \"$out\" | eval \"$until\"; then break; fi; sleep 0.5; done; printf '%s\\n' \"$out\"; }\n",
    );
    let mut single_daemon = false;
    for (block, commands) in [("single", single), ("fleet", fleet)] {
        if block == "fleet" {
            assert!(single_daemon, "the single node block starts a daemon");
            s.push_str(
                "kill $single_daemon; wait $single_daemon 2>/dev/null\n\
                 for _ in $(seq 300); do curl -sf http://127.0.0.1:7071/healthz >/dev/null || break; sleep 0.1; done\n",
            );
        }
        for command in commands {
            s.push_str(&format!("echo '+ {}'\n", command.replace('\'', "'\\''")));
            if let Some(server) = command.strip_suffix('&') {
                s.push_str(&format!("{server} 2>>servers.log &\n"));
                if block == "single" && server.contains(" daemon ") {
                    single_daemon = true;
                    s.push_str("single_daemon=$!\n");
                }
                s.push_str(&format!(
                    "wait_http http://127.0.0.1:{}/healthz\n",
                    port_of(server)
                ));
            } else if command.starts_with("lazyblk nodes") {
                s.push_str(&format!(
                    "until='[ $(grep -c http://127.0.0.1: ) -ge 2 ]' retry {command}\n"
                ));
            } else if command.contains("--fleet") {
                s.push_str(&format!(
                    "until='[ $(grep -c READY ) -ge 2 ]' retry {command}\n"
                ));
            } else {
                s.push_str(&format!("{command} 2>&1\n"));
            }
        }
    }
    s.push_str("echo '+ end'\nkill $(jobs -p) 2>/dev/null; wait 2>/dev/null\n");
    s
}

/// The output of each command, by the command as written.
pub fn outputs(transcript: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in transcript.lines() {
        if let Some(command) = line.strip_prefix("+ ") {
            out.push((command.to_string(), String::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    out
}
