//! Name lookups for smoke: the system's resolver (what browsers use), or, with `--dns-server`, one DNS server asked
//! directly (a test's own server, or the zone's authoritative server before the records have spread). Messages are
//! built and read by `hickory-proto`; this module only sends them over UDP and follows CNAMEs.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// Each query: answered within this, tried this many times.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
const TRIES: u32 = 2;
/// CNAME hops followed at most.
const MAX_CHAIN: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    System,
    Server(SocketAddr),
}

/// What a name resolves to: its addresses, and the CNAMEs on the way (only known when asking a server directly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub addresses: Vec<IpAddr>,
    pub aliases: Vec<String>,
}

impl Lookup {
    /// `1.2.3.4, ::1` or `CNAME foobar.com → 1.2.3.4`.
    pub fn describe(&self) -> String {
        let addresses: Vec<String> = self.addresses.iter().map(IpAddr::to_string).collect();
        let mut text = self.aliases.iter().map(|a| format!("CNAME {a} → ")).collect::<String>();
        text.push_str(&addresses.join(", "));
        text
    }
}

impl Resolver {
    /// The addresses of `name`, sorted and without repeats; `Err` says why there are none.
    pub fn lookup(&self, name: &str) -> Result<Lookup, String> {
        let mut lookup = match self {
            Resolver::System => Lookup {
                addresses: (name, 0)
                    .to_socket_addrs()
                    .map_err(|err| format!("{name} does not resolve ({err})"))?
                    .map(|a| a.ip())
                    .collect(),
                aliases: Vec::new(),
            },
            Resolver::Server(server) => ask(*server, name)?,
        };
        lookup.addresses.sort();
        lookup.addresses.dedup();
        if lookup.addresses.is_empty() {
            return Err(format!("{name} has no A or AAAA record"));
        }
        Ok(lookup)
    }
}

/// A and AAAA of `name` from `server`, following CNAMEs (in the answer, or by asking again for the target).
fn ask(server: SocketAddr, name: &str) -> Result<Lookup, String> {
    let mut lookup = Lookup {
        addresses: Vec::new(),
        aliases: Vec::new(),
    };
    let mut current = Name::from_ascii(name)
        .map_err(|err| format!("`{name}` is not a DNS name ({err})"))?
        .to_lowercase();
    current.set_fqdn(true);
    for record_type in [RecordType::A, RecordType::AAAA] {
        let mut asked = current.clone();
        for _ in 0..MAX_CHAIN {
            let answer = query(server, &asked, record_type)?;
            if answer.metadata.response_code == ResponseCode::NXDomain {
                return Err(format!("{name} does not exist (NXDOMAIN from {server})"));
            }
            if answer.metadata.response_code != ResponseCode::NoError {
                return Err(format!(
                    "{server} answered {} for {name}",
                    answer.metadata.response_code
                ));
            }
            // Walk the chain inside this answer: records for the name asked, then for each CNAME target.
            let mut target = asked.clone();
            let mut found = false;
            for _ in 0..MAX_CHAIN {
                let mut next = None;
                for record in answer.answers.iter().filter(|r| r.name.to_lowercase() == target) {
                    match &record.data {
                        RData::A(a) => {
                            lookup.addresses.push(IpAddr::V4(a.0));
                            found = true;
                        }
                        RData::AAAA(aaaa) => {
                            lookup.addresses.push(IpAddr::V6(aaaa.0));
                            found = true;
                        }
                        RData::CNAME(alias) => next = Some(alias.0.to_lowercase()),
                        _ => {}
                    }
                }
                match next {
                    Some(alias) if !found => {
                        let shown = alias.to_string().trim_end_matches('.').to_string();
                        if !lookup.aliases.contains(&shown) {
                            lookup.aliases.push(shown);
                        }
                        target = alias;
                    }
                    _ => break,
                }
            }
            if found || target == asked {
                break;
            }
            // A CNAME whose target's records were not in the answer: ask for the target.
            asked = target;
        }
    }
    Ok(lookup)
}

fn query(server: SocketAddr, name: &Name, record_type: RecordType) -> Result<Message, String> {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name.clone(), record_type));
    let bytes = message
        .to_vec()
        .map_err(|err| format!("cannot encode a DNS query: {err}"))?;
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .expect("an address");
    let socket = UdpSocket::bind(bind).map_err(|err| format!("cannot open a UDP socket: {err}"))?;
    socket
        .set_read_timeout(Some(QUERY_TIMEOUT))
        .map_err(|err| err.to_string())?;
    socket
        .connect(server)
        .map_err(|err| format!("cannot reach the DNS server {server}: {err}"))?;
    let mut buffer = [0u8; 4096];
    for _ in 0..TRIES {
        socket
            .send(&bytes)
            .map_err(|err| format!("cannot reach the DNS server {server}: {err}"))?;
        loop {
            match socket.recv(&mut buffer) {
                Ok(n) => match Message::from_vec(&buffer[..n]) {
                    // Only the answer to this query (same id) counts; anything else is ignored.
                    Ok(answer) if answer.metadata.id == message.metadata.id => return Ok(answer),
                    _ => continue,
                },
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(err) => return Err(format!("the DNS server {server} did not answer: {err}")),
            }
        }
    }
    Err(format!(
        "the DNS server {server} did not answer within {} s ({TRIES} tries)",
        QUERY_TIMEOUT.as_secs() * u64::from(TRIES)
    ))
}
