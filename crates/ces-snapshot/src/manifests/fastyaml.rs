//! A fast path for plain manifests: libyaml's event parser (unsafe-libyaml, about 2.5x serde-saphyr's speed on the
//! same documents) building the JSON value serde-saphyr would build.
//!
//! It decides only what it decides exactly as serde-saphyr does, and gives up (`None`) on everything else, so the
//! caller parses that document with serde-saphyr and nothing changes in meaning or in error messages:
//! - scalars: quoted ones are strings; plain ones are null (`~`, `null`, empty), booleans in Kubernetes' YAML 1.1
//!   spelling (`y`, `yes`, `on`, `true`, … as serde-saphyr reads them), decimal integers, and strings that cannot be
//!   read as anything else; any other number-like plain scalar (floats, `0777`, `0x1F`, `1_000`, `01:30`, `.inf`)
//!   gives up, except dotted quads such as IP addresses (strings);
//! - tags, anchors, aliases, merge keys (`<<`), block scalars (`|`, `>`), duplicate keys, keys that are not strings,
//!   several documents, nesting deeper than 128 levels, and invalid YAML give up.
//!
//! `crates/ces-snapshot/src/manifests/tests.rs` checks that every document of the examples and fixtures, and a list
//! of tricky ones, parses to the same value both ways whenever the fast path answers.

use std::mem::MaybeUninit;

use serde_json::{Map, Value};
use unsafe_libyaml as unsafe_y;

const MAX_DEPTH: usize = 128;

enum Frame {
    Seq(Vec<Value>),
    Map(Map<String, Value>, Option<String>),
}

/// Parses one YAML document, or `None` (see the module documentation).
pub fn parse(text: &str) -> Option<Value> {
    // SAFETY: the parser is initialised before use and deleted after; the input outlives it; every event is
    // deleted after it is read, and its pointers are read only before that.
    unsafe {
        let mut parser = MaybeUninit::<unsafe_y::yaml_parser_t>::uninit();
        if !unsafe_y::yaml_parser_initialize(parser.as_mut_ptr()).ok {
            return None;
        }
        let parser = parser.as_mut_ptr();
        unsafe_y::yaml_parser_set_input_string(parser, text.as_ptr(), text.len() as _);
        let value = events(parser);
        unsafe_y::yaml_parser_delete(parser);
        value
    }
}

/// # Safety
/// `parser` is initialised with its input set.
unsafe fn events(parser: *mut unsafe_y::yaml_parser_t) -> Option<Value> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Value> = None;
    let mut documents = 0;
    loop {
        let mut event = MaybeUninit::<unsafe_y::yaml_event_t>::uninit();
        if !unsafe { unsafe_y::yaml_parser_parse(parser, event.as_mut_ptr()) }.ok {
            return None;
        }
        let ev = event.as_mut_ptr();
        let ty = unsafe { (*ev).type_ };
        let step = unsafe { step(ev, &mut stack, &mut root, &mut documents) };
        unsafe { unsafe_y::yaml_event_delete(ev) };
        step?;
        if ty == unsafe_y::YAML_STREAM_END_EVENT {
            break;
        }
    }
    if !stack.is_empty() {
        return None;
    }
    Some(root.unwrap_or(Value::Null))
}

/// One event; `None` gives up.
///
/// # Safety
/// `ev` is an event the parser just produced.
unsafe fn step(
    ev: *mut unsafe_y::yaml_event_t,
    stack: &mut Vec<Frame>,
    root: &mut Option<Value>,
    documents: &mut usize,
) -> Option<()> {
    let e = unsafe { &*ev };
    match e.type_ {
        unsafe_y::YAML_STREAM_START_EVENT | unsafe_y::YAML_DOCUMENT_END_EVENT | unsafe_y::YAML_STREAM_END_EVENT => {
            Some(())
        }
        unsafe_y::YAML_DOCUMENT_START_EVENT => {
            *documents += 1;
            (*documents == 1).then_some(())
        }
        unsafe_y::YAML_ALIAS_EVENT => None,
        unsafe_y::YAML_SCALAR_EVENT => {
            let s = unsafe { e.data.scalar };
            if !s.anchor.is_null() || !s.tag.is_null() {
                return None;
            }
            let bytes = unsafe { std::slice::from_raw_parts(s.value, s.length as usize) };
            let text = std::str::from_utf8(bytes).ok()?;
            let (value, plain) = match s.style {
                unsafe_y::YAML_PLAIN_SCALAR_STYLE => (resolve(text)?, true),
                unsafe_y::YAML_SINGLE_QUOTED_SCALAR_STYLE | unsafe_y::YAML_DOUBLE_QUOTED_SCALAR_STYLE => {
                    (Value::String(text.to_string()), false)
                }
                _ => return None,
            };
            push(stack, root, value, plain)
        }
        unsafe_y::YAML_SEQUENCE_START_EVENT => {
            let s = unsafe { e.data.sequence_start };
            if !s.anchor.is_null() || !s.tag.is_null() || stack.len() >= MAX_DEPTH {
                return None;
            }
            stack.push(Frame::Seq(Vec::new()));
            Some(())
        }
        unsafe_y::YAML_MAPPING_START_EVENT => {
            let m = unsafe { e.data.mapping_start };
            if !m.anchor.is_null() || !m.tag.is_null() || stack.len() >= MAX_DEPTH {
                return None;
            }
            stack.push(Frame::Map(Map::new(), None));
            Some(())
        }
        unsafe_y::YAML_SEQUENCE_END_EVENT => match stack.pop()? {
            Frame::Seq(items) => push(stack, root, Value::Array(items), false),
            Frame::Map(..) => None,
        },
        unsafe_y::YAML_MAPPING_END_EVENT => match stack.pop()? {
            Frame::Map(map, None) => push(stack, root, Value::Object(map), false),
            _ => None,
        },
        _ => None,
    }
}

/// Puts a finished value where it belongs: the root, the next item of a sequence, or a key or value of a mapping.
fn push(stack: &mut [Frame], root: &mut Option<Value>, value: Value, plain: bool) -> Option<()> {
    match stack.last_mut() {
        None => {
            if root.is_some() {
                return None;
            }
            *root = Some(value);
        }
        Some(Frame::Seq(items)) => items.push(value),
        Some(Frame::Map(map, key @ None)) => {
            let Value::String(k) = value else { return None };
            if (plain && k == "<<") || map.contains_key(&k) {
                return None;
            }
            *key = Some(k);
        }
        Some(Frame::Map(map, key)) => {
            map.insert(key.take()?, value);
        }
    }
    Some(())
}

/// A plain scalar as serde-saphyr reads it, or `None` when this fast path does not decide it.
fn resolve(s: &str) -> Option<Value> {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Some(Value::Null),
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => {
            return Some(Value::Bool(true));
        }
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => {
            return Some(Value::Bool(false));
        }
        _ => {}
    }
    let lower = s.to_ascii_lowercase();
    if matches!(lower.as_str(), "null" | "y" | "yes" | "n" | "no" | "on" | "off" | "true" | "false" | "nan" | "inf") {
        return None;
    }
    let first = s.as_bytes()[0];
    if first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'.') {
        // A decimal integer.
        let digits = s.strip_prefix('-').unwrap_or(s);
        if !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'))
        {
            if let Ok(i) = s.parse::<i64>() {
                return Some(Value::from(i));
            }
            return s.parse::<u64>().ok().map(Value::from);
        }
        // A dotted quad (an IP address, a version): a string.
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && s.bytes().filter(|b| *b == b'.').count() >= 2
            && !s.starts_with('.')
            && !s.ends_with('.')
            && !s.contains("..")
        {
            return Some(Value::String(s.to_string()));
        }
        // Anything else that could be a number in some YAML reading: leave it to serde-saphyr.
        let numberish = |b: u8| b.is_ascii_hexdigit() || b"+-._:xXoOiInN".contains(&b);
        if s.bytes().all(numberish) {
            return None;
        }
    }
    Some(Value::String(s.to_string()))
}
