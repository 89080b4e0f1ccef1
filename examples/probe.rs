use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::time::Duration;
fn main() {
    let topic = std::env::args().nth(1).unwrap();
    let p: i32 = std::env::args().nth(2).unwrap().parse().unwrap();
    let start: i64 = std::env::args().nth(3).unwrap().parse().unwrap();
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .set("group.id", "probe2")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, p, Offset::Offset(start))
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut next = start;
    let mut n = 0;
    let mut anomalies = 0;
    loop {
        match c.poll(Duration::from_secs(5)) {
            Some(Ok(m)) => {
                n += 1;
                if m.offset() != next {
                    anomalies += 1;
                    if anomalies < 20 {
                        println!("expected {next} got {}", m.offset());
                    }
                }
                next = m.offset() + 1;
            }
            Some(Err(e)) => {
                println!("err/eof {e} after {n} msgs, next {next}");
                break;
            }
            None => {
                println!("timeout after {n}");
                break;
            }
        }
    }
    println!("anomalies {anomalies}");
}
