//! Multi-buffer IETF ChaCha20-Poly1305: the messages of one read batch sealed or opened
//! together, sixteen ChaCha20 blocks and eight Poly1305 chains at a time with AVX-512.
//!
//! A short message costs one aws-lc call of a few hundred nanoseconds, nearly all of it the
//! latency of ChaCha20's twenty rounds and of one Poly1305 chain, with most of the CPU's
//! vector width idle. [`Batch`] collects the messages a session handles from one read and
//! computes them side by side, so that latency is paid once for many. The result is RFC 8439
//! ChaCha20-Poly1305, byte for byte: the tests check it against aws-lc, RustCrypto and the
//! RFC's vectors, and on a CPU without AVX-512F the same batch is computed with aws-lc, one
//! message at a time.
//!
//! This module owns only the arithmetic over buffers it is handed: no key storage, no I/O.
//!
//! It is the one module allowed `unsafe`: to call `#[target_feature]` kernels after the CPU
//! features were detected at run time, and to move 64-byte values between arrays and vector
//! registers. Every unsafe block carries a `// Safety:` comment.

#![allow(unsafe_code)]

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use zeroize::Zeroize;

mod chacha;
pub(crate) mod poly;

use super::TAG_LEN;

/// Messages shorter than this are batched; longer ones are sealed on their own, where one
/// message already fills the vector units (see `aead::LARGE_FROM`).
pub const BATCH_BELOW: usize = 4096;

/// Batches of at most this many messages go one by one through aws-lc when the caller already
/// holds the keys set up ([`Batch::seal_with`], [`Batch::open_with`]): the vector passes have a
/// fixed cost of about 0.9 µs (`seal_small_batch` in `benches/envelope.rs`), more than one or
/// two aws-lc calls. At low rates a read holds one message, so this is the common case there.
pub const SMALL_BATCH: usize = 2;

/// The aws-lc key a caller already holds for a subkey id, if any.
type Cached<'k> = dyn Fn(u64) -> Option<&'k LessSafeKey> + 'k;

/// The longest text one nonce can protect: 2^32 - 1 blocks after the Poly1305 key block
/// (RFC 8439, section 2.8), so the 32-bit block counter never wraps.
const MAX_TEXT_LEN: u64 = (1u64 << 38) - 64;

/// Whether this CPU runs the AVX-512 kernels. Detection is cached by std.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A process-unique name for one subkey, so a batch stores each subkey once.
pub(crate) fn next_key_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One subkey of a batch, as the eight little-endian words ChaCha20 takes.
struct KeyEntry {
    id: u64,
    words: [u32; 8],
}

impl Drop for KeyEntry {
    fn drop(&mut self) {
        self.words.zeroize();
    }
}

/// One queued message.
#[derive(Debug, Clone)]
struct Job {
    key: usize,
    /// ChaCha20 state words 13..16: the 12-byte IETF nonce `00000000 || tail`.
    nonce: [u32; 3],
    /// Padded AAD in the arena, and its length before padding.
    aad: Range<usize>,
    aad_len: usize,
    /// Plaintext (seal) or ciphertext (open) in the caller's buffer.
    text: Range<usize>,
    /// 32 bytes in the arena for the padded partial last block and the length block.
    tail: usize,
    /// Seal: where the tag goes in the caller's buffer. Open: unused.
    tag_at: usize,
    /// Open: the tag the envelope carries.
    expected: [u8; TAG_LEN],
}

impl Job {
    fn blocks(&self) -> usize {
        self.text.len().div_ceil(64)
    }
}

/// Messages queued for one pass of sealing or opening.
///
/// Ranges refer to the buffer later passed to [`Batch::seal`] or [`Batch::open`]; the caller
/// may keep appending to that buffer in between, as long as it does not move or change the
/// queued bytes. Subkeys and Poly1305 keys held here are zeroized when the pass ends.
#[derive(Default)]
pub struct Batch {
    keys: Vec<KeyEntry>,
    jobs: Vec<Job>,
    arena: Vec<u8>,
    /// Per job during a pass: the Poly1305 one-time key, then the computed tag.
    poly_keys: Vec<[u8; 32]>,
    tags: Vec<[u8; TAG_LEN]>,
    /// Job indices by text length, so the Poly1305 lanes of one group end together.
    order: Vec<usize>,
    /// Open: jobs whose tag did not verify.
    failed: Vec<bool>,
    /// Tests force the one-at-a-time path that CPUs without AVX-512F take.
    #[cfg(test)]
    scalar: bool,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("jobs", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    fn key_index(&mut self, id: u64, subkey: &[u8; 32]) -> usize {
        if let Some(i) = self.keys.iter().rposition(|k| k.id == id) {
            return i;
        }
        let mut words = [0u32; 8];
        for (w, c) in words.iter_mut().zip(subkey.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        self.keys.push(KeyEntry { id, words });
        self.keys.len() - 1
    }

    /// Queues one message under `subkey` (named `key_id`) and the IETF nonce
    /// `00000000 || tail`, with `AAD = aad[0] || aad[1]`. `text` is its bytes in the
    /// caller's buffer; a seal writes the tag at `tag_at`, an open checks `expected`.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        key_id: u64,
        subkey: &[u8; 32],
        tail: [u8; 8],
        aad: [&[u8]; 2],
        text: Range<usize>,
        tag_at: usize,
        expected: [u8; TAG_LEN],
    ) {
        let key = self.key_index(key_id, subkey);
        let start = self.arena.len();
        self.arena.extend_from_slice(aad[0]);
        self.arena.extend_from_slice(aad[1]);
        let aad_len = self.arena.len() - start;
        let padded = aad_len.div_ceil(16) * 16;
        let tail_at = start + padded;
        self.arena.resize(tail_at + 32, 0);
        self.jobs.push(Job {
            key,
            nonce: [
                0,
                u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]),
                u32::from_le_bytes([tail[4], tail[5], tail[6], tail[7]]),
            ],
            aad: start..tail_at,
            aad_len,
            text,
            tail: tail_at,
            tag_at,
            expected,
        });
    }

    /// Queues a message to seal in place; see [`Batch::seal`].
    pub(crate) fn push_seal(
        &mut self,
        key_id: u64,
        subkey: &[u8; 32],
        tail: [u8; 8],
        aad: [&[u8]; 2],
        text: Range<usize>,
        tag_at: usize,
    ) {
        self.push(key_id, subkey, tail, aad, text, tag_at, [0; TAG_LEN]);
    }

    /// Queues a message to open in place; see [`Batch::open`].
    pub(crate) fn push_open(
        &mut self,
        key_id: u64,
        subkey: &[u8; 32],
        tail: [u8; 8],
        aad: [&[u8]; 2],
        text: Range<usize>,
        expected: [u8; TAG_LEN],
    ) {
        self.push(key_id, subkey, tail, aad, text, 0, expected);
    }

    /// Encrypts every queued text in place in `buf` and writes its tag, then empties the
    /// batch. A queued range outside `buf` is a caller bug: nothing panics, but the result
    /// is an error and `buf` may then hold plaintext, so the caller must not send it.
    pub fn seal(&mut self, buf: &mut [u8]) -> Result<(), super::EnvelopeError> {
        self.seal_cached(buf, &|_| None)
    }

    /// [`Batch::seal`], with a batch of at most [`SMALL_BATCH`] messages under `sealer`'s
    /// subkey sealed one by one with the key it already holds.
    pub fn seal_with(
        &mut self,
        buf: &mut [u8],
        sealer: &super::Sealer,
    ) -> Result<(), super::EnvelopeError> {
        self.seal_cached(buf, &|id| sealer.cached_key(id))
    }

    /// Whether this batch is small enough, and its keys all held by the caller, to go one by
    /// one.
    fn small(&self, cached: &Cached<'_>) -> bool {
        self.jobs.len() <= SMALL_BATCH && self.keys.iter().all(|k| cached(k.id).is_some())
    }

    fn seal_cached(
        &mut self,
        buf: &mut [u8],
        cached: &Cached<'_>,
    ) -> Result<(), super::EnvelopeError> {
        self.drop_out_of_bounds(buf.len(), true);
        if self.small(cached) {
            self.scalar(buf, true, cached);
        } else if self.vectorised() {
            // Safety: AVX-512F is present (`vectorised` checked it).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                self.seal_avx512(buf)
            };
        } else {
            self.scalar(buf, true, &|_| None);
        }
        let complete = !self.failed.contains(&true);
        self.clear();
        if complete {
            Ok(())
        } else {
            Err(super::EnvelopeError::Backend)
        }
    }

    /// Verifies and decrypts every queued text in place in `buf`, then empties the batch.
    /// Calls `failed(i)` for the `i`-th queued message (in queue order) whose tag did not
    /// verify; its bytes in `buf` are zeroed, so no unauthenticated plaintext is left.
    pub fn open(&mut self, buf: &mut [u8], failed: impl FnMut(usize)) {
        self.open_cached(buf, &|_| None, failed)
    }

    /// [`Batch::open`], with a batch of at most [`SMALL_BATCH`] messages under subkeys
    /// `opener` holds opened one by one with its keys.
    pub fn open_with(&mut self, buf: &mut [u8], opener: &super::Opener, failed: impl FnMut(usize)) {
        self.open_cached(buf, &|id| opener.cached_key(id), failed)
    }

    fn open_cached(&mut self, buf: &mut [u8], cached: &Cached<'_>, mut failed: impl FnMut(usize)) {
        self.drop_out_of_bounds(buf.len(), false);
        if self.small(cached) {
            self.scalar(buf, false, cached);
        } else if self.vectorised() {
            // Safety: AVX-512F is present (`vectorised` checked it).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                self.open_avx512(buf)
            };
        } else {
            self.scalar(buf, false, &|_| None);
        }
        for (i, job) in self.jobs.iter().enumerate() {
            if self.failed[i] {
                buf[job.text.clone()].zeroize();
                failed(i);
            }
        }
        self.clear();
    }

    /// Gives back the memory of a batch that grew large, for a connection gone quiet.
    pub fn release(&mut self) {
        self.clear();
        self.keys = Vec::new();
        self.jobs = Vec::new();
        self.arena = Vec::new();
        self.poly_keys = Vec::new();
        self.tags = Vec::new();
        self.order = Vec::new();
        self.failed = Vec::new();
    }

    fn vectorised(&self) -> bool {
        #[cfg(test)]
        if self.scalar {
            return false;
        }
        available()
    }

    /// Marks jobs whose ranges do not fit `len` as failed and empties their ranges, so the
    /// passes below never index outside the buffer.
    fn drop_out_of_bounds(&mut self, len: usize, seal: bool) {
        self.failed.clear();
        self.failed.resize(self.jobs.len(), false);
        for (i, job) in self.jobs.iter_mut().enumerate() {
            let tag_end = job.tag_at.checked_add(TAG_LEN);
            let bad = job.text.start > job.text.end
                || job.text.end > len
                || job.text.len() as u64 > MAX_TEXT_LEN
                || (seal && tag_end.is_none_or(|e| e > len));
            if bad {
                job.text = 0..0;
                job.tag_at = 0;
                self.failed[i] = true;
            }
        }
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.jobs.clear();
        self.arena.clear();
        wipe(&mut self.poly_keys);
        self.poly_keys.clear();
        self.tags.clear();
        self.order.clear();
    }

    /// Writes each job's padded last partial block and its length block into the arena,
    /// from the text as it is now in `buf` (ciphertext: after sealing, before opening).
    fn write_tails(&mut self, buf: &[u8]) {
        for job in &self.jobs {
            let text = &buf[job.text.clone()];
            let full = text.len() & !15;
            let t = &mut self.arena[job.tail..job.tail + 32];
            t[..16].fill(0);
            t[..text.len() - full].copy_from_slice(&text[full..]);
            t[16..24].copy_from_slice(&(job.aad_len as u64).to_le_bytes());
            t[24..].copy_from_slice(&(text.len() as u64).to_le_bytes());
        }
    }

    /// The three runs of whole blocks Poly1305 reads for job `j`.
    fn poly_input<'a>(&'a self, j: usize, buf: &'a [u8]) -> poly::PolyInput<'a> {
        let job = &self.jobs[j];
        let full = job.text.len() & !15;
        let partial = job.text.len() != full;
        let tail_from = if partial { job.tail } else { job.tail + 16 };
        poly::PolyInput {
            parts: [
                &self.arena[job.aad.clone()],
                &buf[job.text.start..job.text.start + full],
                &self.arena[tail_from..job.tail + 32],
            ],
        }
    }

    fn sort_by_length(&mut self) {
        self.order.clear();
        self.order.extend(0..self.jobs.len());
        let jobs = &self.jobs;
        // Streams of one size are the common case and are already in order.
        if !self.order.is_sorted_by_key(|&j| jobs[j].text.len()) {
            self.order.sort_unstable_by_key(|&j| jobs[j].text.len());
        }
    }

    /// Runs ChaCha20 over the blocks of every job `want(job)` accepts, sixteen at a time:
    /// block 0 only, or blocks `first..=blocks(job)` when `data` is set. Block 0 becomes the
    /// job's Poly1305 key; block `n > 0` is XORed into the job's text at `64 * (n - 1)`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn keystream(
        &mut self,
        buf: &mut [u8],
        first: usize,
        data: bool,
        want: impl Fn(usize) -> bool,
    ) {
        let mut lanes = chacha::Lanes::zeroed();
        let mut blocks = chacha::Blocks([[0; 64]; 16]);
        let mut tasks = [(0usize, 0u32); 16];
        let mut filled = 0;
        for j in 0..self.jobs.len() {
            if !want(j) {
                continue;
            }
            let last = if data { self.jobs[j].blocks() } else { 0 };
            for counter in first..=last {
                let job = &self.jobs[j];
                // Fits: texts over MAX_TEXT_LEN were refused before the pass.
                lanes.words[12][filled] = counter as u32;
                for (n, v) in job.nonce.iter().enumerate() {
                    lanes.words[13 + n][filled] = *v;
                }
                tasks[filled] = (j, counter as u32);
                filled += 1;
                if filled == 16 {
                    self.run_blocks(buf, &mut lanes, &mut blocks, &tasks);
                    filled = 0;
                }
            }
        }
        if filled > 0 {
            self.run_blocks(buf, &mut lanes, &mut blocks, &tasks[..filled]);
        }
        lanes.words.zeroize();
        blocks.0.zeroize();
    }

    /// One call of the ChaCha20 kernel for `tasks`, whose counters and nonces are already in
    /// `lanes`; the keys go in here, once if all tasks share one.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn run_blocks(
        &mut self,
        buf: &mut [u8],
        lanes: &mut chacha::Lanes,
        blocks: &mut chacha::Blocks,
        tasks: &[(usize, u32)],
    ) {
        let key_of = |t: &(usize, u32)| self.jobs[t.0].key;
        let first = key_of(&tasks[0]);
        if tasks.iter().all(|t| key_of(t) == first) {
            chacha::blocks_x16(lanes, Some(&self.keys[first].words), blocks);
        } else {
            for (lane, t) in tasks.iter().enumerate() {
                for (w, k) in self.keys[key_of(t)].words.iter().enumerate() {
                    lanes.words[4 + w][lane] = *k;
                }
            }
            chacha::blocks_x16(lanes, None, blocks);
        }
        self.apply(buf, blocks, tasks);
    }

    /// Uses the key-stream blocks for `tasks` (job, counter), lane by lane.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn apply(&mut self, buf: &mut [u8], blocks: &chacha::Blocks, tasks: &[(usize, u32)]) {
        for (block, &(j, counter)) in blocks.0.iter().zip(tasks) {
            if counter == 0 {
                self.poly_keys[j].copy_from_slice(&block[..32]);
                continue;
            }
            let text = &self.jobs[j].text;
            let at = text.start + 64 * (counter as usize - 1);
            let end = (at + 64).min(text.end);
            let dst = &mut buf[at..end];
            if let Ok(dst) = <&mut [u8; 64]>::try_from(&mut *dst) {
                // A whole block: one fixed-size XOR the compiler turns into one vector op.
                for (b, k) in dst.iter_mut().zip(block.iter()) {
                    *b ^= *k;
                }
            } else {
                for (b, k) in dst.iter_mut().zip(block.iter()) {
                    *b ^= *k;
                }
            }
        }
    }

    /// Computes the tag of every job `want(job)` accepts, eight lanes at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn authenticate(&mut self, buf: &[u8], want: impl Fn(usize) -> bool) {
        self.sort_by_length();
        let mut group = [0usize; 8];
        let mut n = 0;
        let mut keys = [[0u8; 32]; 8];
        let mut tags = [[0u8; TAG_LEN]; 8];
        for i in 0..self.order.len() {
            let j = self.order[i];
            if !want(j) {
                continue;
            }
            group[n] = j;
            n += 1;
            if n == 8 {
                self.authenticate_group(buf, &group[..n], &mut keys, &mut tags);
                n = 0;
            }
        }
        if n > 0 {
            self.authenticate_group(buf, &group[..n], &mut keys, &mut tags);
        }
        keys.zeroize();
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn authenticate_group(
        &mut self,
        buf: &[u8],
        group: &[usize],
        keys: &mut [[u8; 32]; 8],
        tags: &mut [[u8; TAG_LEN]; 8],
    ) {
        let empty = poly::PolyInput { parts: [&[]; 3] };
        let mut inputs = [empty; 8];
        for (lane, &j) in group.iter().enumerate() {
            keys[lane] = self.poly_keys[j];
            inputs[lane] = self.poly_input(j, buf);
        }
        poly::poly1305_lanes(&keys[..group.len()], &inputs[..group.len()], &mut tags[..]);
        for (lane, &j) in group.iter().enumerate() {
            self.tags[j] = tags[lane];
        }
    }

    fn start_pass(&mut self) {
        self.poly_keys.clear();
        self.poly_keys.resize(self.jobs.len(), [0; 32]);
        self.tags.clear();
        self.tags.resize(self.jobs.len(), [0; TAG_LEN]);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn seal_avx512(&mut self, buf: &mut [u8]) {
        self.start_pass();
        let skip = std::mem::take(&mut self.failed);
        self.keystream(buf, 0, true, |j| !skip[j]);
        self.write_tails(buf);
        self.authenticate(buf, |j| !skip[j]);
        for (j, job) in self.jobs.iter().enumerate() {
            if !skip[j] {
                buf[job.tag_at..job.tag_at + TAG_LEN].copy_from_slice(&self.tags[j]);
            }
        }
        self.failed = skip;
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn open_avx512(&mut self, buf: &mut [u8]) {
        self.start_pass();
        let mut failed = std::mem::take(&mut self.failed);
        // Poly1305 keys only: the ciphertext must be authenticated before it is decrypted.
        self.keystream(buf, 0, false, |j| !failed[j]);
        self.write_tails(buf);
        self.authenticate(buf, |j| !failed[j]);
        for (j, job) in self.jobs.iter().enumerate() {
            if !failed[j] && !crate::ct::eq_tag(&self.tags[j], &job.expected) {
                failed[j] = true;
            }
        }
        self.keystream(buf, 1, true, |j| !failed[j]);
        self.failed = failed;
    }

    fn scalar_key<'a>(
        keys: &'a mut [Option<LessSafeKey>],
        entry: &KeyEntry,
        i: usize,
    ) -> Option<&'a LessSafeKey> {
        if keys[i].is_none() {
            let mut bytes = [0u8; 32];
            for (c, w) in bytes.chunks_exact_mut(4).zip(entry.words.iter()) {
                c.copy_from_slice(&w.to_le_bytes());
            }
            let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes).ok();
            bytes.zeroize();
            keys[i] = Some(LessSafeKey::new(unbound?));
        }
        keys[i].as_ref()
    }

    fn scalar_nonce(job: &Job) -> Nonce {
        let mut n = [0u8; 12];
        n[4..8].copy_from_slice(&job.nonce[1].to_le_bytes());
        n[8..].copy_from_slice(&job.nonce[2].to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Each job on its own with aws-lc-rs, under the caller's key for its subkey where it
    /// holds one; a job that fails is marked in `failed`.
    fn scalar(&mut self, buf: &mut [u8], seal: bool, cached: &Cached<'_>) {
        // Built only for a key the caller does not hold: a small batch allocates nothing.
        let mut keys = Vec::new();
        for (j, job) in self.jobs.iter().enumerate() {
            if self.failed[j] {
                continue;
            }
            let entry = &self.keys[job.key];
            let key = match cached(entry.id) {
                Some(key) => Some(key),
                None => {
                    if keys.is_empty() {
                        keys = self.keys.iter().map(|_| None).collect();
                    }
                    Self::scalar_key(&mut keys, entry, job.key)
                }
            };
            let Some(key) = key else {
                self.failed[j] = true;
                continue;
            };
            let aad = Aad::from(&self.arena[job.aad.start..job.aad.start + job.aad_len]);
            let nonce = Self::scalar_nonce(job);
            let text = &mut buf[job.text.clone()];
            let done = if seal {
                match key.seal_in_place_separate_tag(nonce, aad, text) {
                    Ok(tag) if tag.as_ref().len() == TAG_LEN => {
                        buf[job.tag_at..job.tag_at + TAG_LEN].copy_from_slice(tag.as_ref());
                        true
                    }
                    _ => false,
                }
            } else {
                key.open_in_place_separate_tag(nonce, aad, &job.expected, text)
                    .is_ok()
            };
            if !done {
                self.failed[j] = true;
            }
        }
    }
}

/// Zeroes a pass's Poly1305 keys, one volatile 32-byte store each. `Vec::zeroize` writes a byte
/// at a time over the whole capacity, which cost 2% of the proxy's CPU at 128 B; the capacity
/// beyond the keys in use was wiped when it was last in use (and `Drop` wipes all of it).
fn wipe(keys: &mut [[u8; 32]]) {
    for k in keys.iter_mut() {
        // Safety: `k` comes from a live exclusive reference, so it is valid, aligned and not
        // aliased.
        unsafe { std::ptr::write_volatile(k, [0; 32]) };
    }
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.poly_keys.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    use chacha20poly1305::ChaCha20Poly1305;

    use super::*;

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    struct Msg {
        key: usize,
        tail: [u8; 8],
        header: Vec<u8>,
        subject: Vec<u8>,
        text: Range<usize>,
        plain: Vec<u8>,
    }

    /// A buffer of messages laid out as a session lays them out: each text followed by
    /// room for its tag, with unrelated bytes in between.
    fn messages(rng: &mut Rng, n: usize, max_len: usize) -> (Vec<[u8; 32]>, Vec<Msg>, Vec<u8>) {
        let keys: Vec<[u8; 32]> = (0..3)
            .map(|_| rng.bytes(32).try_into().expect("32 bytes"))
            .collect();
        let mut buf = Vec::new();
        let mut msgs = Vec::new();
        for _ in 0..n {
            let gap = rng.below(20);
            buf.extend(rng.bytes(gap));
            // Mostly one length, as a stream of one publisher's messages, some others.
            let len = if rng.below(3) == 0 {
                128
            } else {
                rng.below(max_len + 1)
            };
            let plain = rng.bytes(len);
            let subject_len = rng.below(70);
            let start = buf.len();
            buf.extend_from_slice(&plain);
            buf.extend_from_slice(&[0; TAG_LEN]);
            msgs.push(Msg {
                key: rng.below(keys.len()),
                tail: rng.bytes(8).try_into().expect("8 bytes"),
                header: rng.bytes(32),
                subject: rng.bytes(subject_len),
                text: start..start + len,
                plain,
            });
        }
        (keys, msgs, buf)
    }

    fn reference(key: &[u8; 32], m: &Msg) -> (Vec<u8>, [u8; TAG_LEN]) {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&m.tail);
        let aad = [&m.header[..], &m.subject[..]].concat();
        let mut ct = m.plain.clone();
        let tag = ChaCha20Poly1305::new(key.into())
            .encrypt_in_place_detached(&nonce.into(), &aad, &mut ct)
            .expect("fits");
        (ct, tag.into())
    }

    fn seal_all(scalar: bool, keys: &[[u8; 32]], msgs: &[Msg], buf: &mut [u8]) {
        let mut batch = Batch::default();
        batch.scalar = scalar;
        for m in msgs {
            batch.push_seal(
                m.key as u64 + 100,
                &keys[m.key],
                m.tail,
                [&m.header, &m.subject],
                m.text.clone(),
                m.text.end,
            );
        }
        assert_eq!(batch.len(), msgs.len());
        batch.seal(buf).expect("every range fits");
        assert!(batch.is_empty());
    }

    fn check_sealed(keys: &[[u8; 32]], msgs: &[Msg], buf: &[u8]) {
        for (i, m) in msgs.iter().enumerate() {
            let (ct, tag) = reference(&keys[m.key], m);
            assert_eq!(&buf[m.text.clone()], &ct[..], "message {i} ciphertext");
            let tag_at = m.text.end;
            assert_eq!(&buf[tag_at..tag_at + TAG_LEN], &tag, "message {i} tag");
        }
    }

    #[test]
    fn batches_seal_exactly_as_rustcrypto_does() {
        let mut rng = Rng(0x5eed_0001);
        for round in 0..40 {
            let n = 1 + rng.below(60);
            let max_len = if round % 2 == 0 { 300 } else { BATCH_BELOW - 1 };
            let (keys, msgs, buf) = messages(&mut rng, n, max_len);
            for scalar in [false, true] {
                let mut b = buf.clone();
                seal_all(scalar, &keys, &msgs, &mut b);
                check_sealed(&keys, &msgs, &b);
            }
        }
    }

    #[test]
    fn every_length_around_the_block_edges_seals_and_opens() {
        let mut rng = Rng(0x5eed_0002);
        let keys = [[7u8; 32]];
        for len in (0..200).chain([1023, 1024, 1025, 4095]) {
            let plain = rng.bytes(len);
            let mut buf = plain.clone();
            buf.extend_from_slice(&[0; TAG_LEN]);
            let m = Msg {
                key: 0,
                tail: [len as u8; 8],
                header: rng.bytes(32),
                subject: rng.bytes(len % 40),
                text: 0..len,
                plain,
            };
            let msgs = [m];
            seal_all(false, &keys, &msgs, &mut buf);
            check_sealed(&keys, &msgs, &buf);
            let m = &msgs[0];
            let mut batch = Batch::default();
            let tag: [u8; 16] = buf[len..].try_into().expect("tag");
            batch.push_open(1, &keys[0], m.tail, [&m.header, &m.subject], 0..len, tag);
            let mut failures = 0;
            batch.open(&mut buf[..len], |_| failures += 1);
            assert_eq!(failures, 0, "length {len}");
            assert_eq!(&buf[..len], &m.plain[..], "length {len}");
        }
    }

    #[test]
    fn batches_open_and_refuse_exactly_the_tampered_messages() {
        let mut rng = Rng(0x5eed_0003);
        for round in 0..30 {
            let n = 1 + rng.below(50);
            let (keys, msgs, mut buf) = messages(&mut rng, n, 1500);
            seal_all(false, &keys, &msgs, &mut buf);
            // Tamper with some: a ciphertext bit, a tag bit, the AAD, the nonce or the key.
            let mut tampered = vec![None; n];
            for (i, m) in msgs.iter().enumerate() {
                if rng.below(4) == 0 {
                    tampered[i] = Some(rng.below(5));
                }
                if tampered[i] == Some(0) && m.text.is_empty() {
                    tampered[i] = Some(1);
                }
            }
            for scalar in [false, true] {
                let mut b = buf.clone();
                let mut batch = Batch::default();
                batch.scalar = scalar;
                for (i, m) in msgs.iter().enumerate() {
                    let mut tag: [u8; 16] = b[m.text.end..m.text.end + 16].try_into().expect("tag");
                    let mut header = m.header.clone();
                    let mut tail = m.tail;
                    let mut key = keys[m.key];
                    match tampered[i] {
                        Some(0) => b[m.text.start + rng.below(m.text.len())] ^= 0x10,
                        Some(1) => tag[rng.below(16)] ^= 0x01,
                        Some(2) => header[rng.below(32)] ^= 0x80,
                        Some(3) => tail[rng.below(8)] ^= 0x04,
                        Some(_) => key[rng.below(32)] ^= 0x40,
                        None => {}
                    }
                    let id = if tampered[i] == Some(4) {
                        1000 + i as u64
                    } else {
                        m.key as u64
                    };
                    batch.push_open(id, &key, tail, [&header, &m.subject], m.text.clone(), tag);
                }
                let mut refused = Vec::new();
                batch.open(&mut b, |i| refused.push(i));
                let want: Vec<usize> = (0..n).filter(|&i| tampered[i].is_some()).collect();
                assert_eq!(refused, want, "round {round}, scalar {scalar}");
                for (i, m) in msgs.iter().enumerate() {
                    if tampered[i].is_some() {
                        assert!(
                            b[m.text.clone()].iter().all(|&x| x == 0),
                            "refused text zeroed"
                        );
                    } else {
                        assert_eq!(&b[m.text.clone()], &m.plain[..], "message {i} opened");
                    }
                }
            }
        }
    }

    fn aws_key(key: &[u8; 32]) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32 bytes"))
    }

    /// Batches of up to SMALL_BATCH messages whose keys the caller holds go one by one under
    /// those keys (a deliberately wrong held key shows which key sealed), larger ones or
    /// ones with a key not held take the usual path; both open and refuse tampering.
    #[test]
    fn small_batches_use_the_keys_the_caller_holds() {
        let mut rng = Rng(0x5eed_0005);
        for n in 1..=SMALL_BATCH + 1 {
            let (keys, msgs, buf) = messages(&mut rng, n, 600);
            let held: Vec<LessSafeKey> = keys.iter().map(aws_key).collect();
            let cached = |id: u64| held.get(usize::try_from(id).ok()?.checked_sub(100)?);
            let push = |batch: &mut Batch, keys: &[[u8; 32]]| {
                for m in &msgs {
                    let (a, t) = ([&m.header[..], &m.subject[..]], m.text.clone());
                    batch.push_seal(m.key as u64 + 100, &keys[m.key], m.tail, a, t, m.text.end);
                }
            };
            let mut b = buf.clone();
            let mut batch = Batch::default();
            push(&mut batch, &keys);
            batch.seal_cached(&mut b, &cached).expect("fits");
            check_sealed(&keys, &msgs, &b);

            // The held keys are wrong: only a batch that used them comes out under them.
            let wrong: Vec<[u8; 32]> = keys.iter().map(|k| k.map(|x| x ^ 1)).collect();
            let wrong_held: Vec<LessSafeKey> = wrong.iter().map(aws_key).collect();
            let wrong_cached =
                |id: u64| wrong_held.get(usize::try_from(id).ok()?.checked_sub(100)?);
            let mut w = buf.clone();
            let mut batch = Batch::default();
            push(&mut batch, &keys);
            batch.seal_cached(&mut w, &wrong_cached).expect("fits");
            if n <= SMALL_BATCH {
                check_sealed(&wrong, &msgs, &w);
            } else {
                check_sealed(&keys, &msgs, &w);
            }
            // A key the caller does not hold: the usual path, under the batch's own copy.
            let mut p = buf.clone();
            let mut batch = Batch::default();
            push(&mut batch, &keys);
            batch.seal_cached(&mut p, &|_| None).expect("fits");
            check_sealed(&keys, &msgs, &p);

            // Open under the held keys, with the last message's tag flipped.
            let mut batch = Batch::default();
            for (i, m) in msgs.iter().enumerate() {
                let mut tag: [u8; 16] = b[m.text.end..m.text.end + 16].try_into().expect("tag");
                if i == n - 1 {
                    tag[3] ^= 1;
                }
                let a = [&m.header[..], &m.subject[..]];
                batch.push_open(
                    m.key as u64 + 100,
                    &keys[m.key],
                    m.tail,
                    a,
                    m.text.clone(),
                    tag,
                );
            }
            let mut refused = Vec::new();
            batch.open_cached(&mut b, &cached, |i| refused.push(i));
            assert_eq!(refused, [n - 1], "{n} messages");
            for m in &msgs[..n - 1] {
                assert_eq!(&b[m.text.clone()], &m.plain[..]);
            }
            assert!(b[msgs[n - 1].text.clone()].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn ranges_outside_the_buffer_fail_without_panicking() {
        let mut batch = Batch::default();
        batch.push_seal(1, &[1; 32], [0; 8], [b"h", b""], 10..20, 20);
        let mut small = [0u8; 12];
        assert!(batch.seal(&mut small).is_err());
        assert!(batch.is_empty());
        let mut batch = Batch::default();
        batch.push_open(1, &[1; 32], [0; 8], [b"h", b""], 5..50, [0; 16]);
        let mut refused = Vec::new();
        batch.open(&mut small, |i| refused.push(i));
        assert_eq!(refused, [0]);
    }

    #[test]
    fn the_batch_keeps_no_key_material_after_a_pass() {
        let mut batch = Batch::default();
        let mut buf = vec![0u8; 64 + TAG_LEN];
        batch.push_seal(1, &[9; 32], [0; 8], [b"h", b"s"], 0..64, 64);
        batch.seal(&mut buf).expect("fits");
        assert!(batch.keys.is_empty() && batch.poly_keys.is_empty());
        assert!(format!("{batch:?}").contains("jobs: 0"));

        // Three messages through the vector pass: every Poly1305 key it held is zero now.
        let mut buf = vec![0u8; 3 * (64 + TAG_LEN)];
        for i in 0..3 {
            let at = i * (64 + TAG_LEN);
            batch.push_seal(
                2,
                &[9; 32],
                [i as u8; 8],
                [b"h", b"s"],
                at..at + 64,
                at + 64,
            );
        }
        batch.seal(&mut buf).expect("fits");
        let spare = batch.poly_keys.spare_capacity_mut();
        assert!(spare.len() >= 3 || !available());
        // Only the slots the pass used: capacity beyond them was never initialised.
        for k in spare.iter().take(if available() { 3 } else { 0 }) {
            // Safety: these three slots held the pass's keys (`resize` initialised them) and
            // `clear` does not de-initialise `[u8; 32]` values; reading them back is sound.
            let k = unsafe { k.assume_init_ref() };
            assert_eq!(k, &[0; 32]);
        }
    }
}
