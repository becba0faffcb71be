//! Multi-buffer IETF ChaCha20-Poly1305: the messages of one read batch sealed or opened
//! together, sixteen ChaCha20 blocks and eight Poly1305 chains at a time with AVX-512.
//!
//! This is hand-written AEAD arithmetic, so it is an opt-in ([`AeadBackend::Batched`],
//! `aead = "batched"`): with the default [`AeadBackend::Audited`] a [`Batch`] queues nothing
//! and every envelope goes through aws-lc-rs or OpenSSL as it is made.
//!
//! A short message costs one aws-lc call of a few hundred nanoseconds, nearly all of it the
//! latency of ChaCha20's twenty rounds and of one Poly1305 chain, with most of the CPU's
//! vector width idle. [`Batch`] collects the messages a session handles from one read and
//! computes them side by side, so that latency is paid once for many. The result is RFC 8439
//! ChaCha20-Poly1305, byte for byte: the tests check every [`Path`] against aws-lc,
//! RustCrypto and the RFC's vectors.
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

/// Whether this CPU also runs the radix-2^44 IFMA Poly1305.
fn ifma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && std::arch::is_x86_feature_detected!("avx512ifma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which code computes the AEAD of envelopes under [`BATCH_BELOW`] bytes. Longer ones always
/// go to OpenSSL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AeadBackend {
    /// aws-lc-rs, one message at a time: audited code only. The default.
    #[default]
    Audited,
    /// This module's AVX-512 kernels over each read's messages: hand-written, opt-in. Runs
    /// as [`AeadBackend::Audited`] on a CPU without AVX-512F.
    Batched,
}

impl AeadBackend {
    pub fn name(self) -> &'static str {
        match self {
            AeadBackend::Audited => "audited",
            AeadBackend::Batched => "batched",
        }
    }

    /// The backend this CPU runs when `self` is asked for, and why it is not `self`.
    pub fn effective(self) -> (AeadBackend, Option<&'static str>) {
        match self {
            AeadBackend::Batched if !available() => (
                AeadBackend::Audited,
                Some("this CPU lacks AVX-512F, which the batched kernels need"),
            ),
            b => (b, None),
        }
    }

    /// One line for the startup log and `--check-config`.
    pub fn describe(self) -> String {
        match self.effective() {
            (AeadBackend::Audited, None) => {
                "audited: aws-lc-rs below 4 KiB, OpenSSL from 4 KiB".to_owned()
            }
            (AeadBackend::Audited, Some(why)) => format!(
                "audited (batched was asked for, but {why}): aws-lc-rs below 4 KiB, OpenSSL \
                 from 4 KiB"
            ),
            (AeadBackend::Batched, _) => format!(
                "batched (opt-in, hand-written): AVX-512 ChaCha20 with {} Poly1305 below \
                 4 KiB, aws-lc-rs for batches of one or two, OpenSSL from 4 KiB",
                if ifma_available() {
                    "radix-2^44 IFMA"
                } else {
                    "radix-2^26"
                }
            ),
        }
    }
}

/// The four ways a [`Batch`] can compute a pass. Production picks one per pass; tests and
/// benches pin one with [`Batch::pinned`] so every path runs on a CPU that has them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// AVX-512 ChaCha20 and the radix-2^44 AVX-512 IFMA Poly1305.
    Ifma,
    /// AVX-512 ChaCha20 and the radix-2^26 AVX-512F Poly1305 (Skylake-SP, Cascade Lake).
    Radix26,
    /// aws-lc-rs one message at a time, under keys made from the batch's own subkeys.
    Scalar,
    /// aws-lc-rs one message at a time, under the keys the caller holds (the batch's own
    /// where it holds none).
    Held,
}

impl Path {
    pub const ALL: [Path; 4] = [Path::Ifma, Path::Radix26, Path::Scalar, Path::Held];

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Path::Ifma => ifma_available(),
            Path::Radix26 => available(),
            Path::Scalar | Path::Held => true,
        }
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
    /// Whether sealers and openers queue envelopes here ([`Batch::defers`]).
    defers: bool,
    /// The path every pass takes, for tests and benches.
    pinned: Option<Path>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("jobs", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

impl Batch {
    /// A batch for a session running `backend`: with [`AeadBackend::Audited`], or batched on
    /// a CPU without AVX-512F, it queues nothing ([`Batch::defers`] is false).
    pub fn new(backend: AeadBackend) -> Self {
        let mut batch = Batch::default();
        batch.defers = backend.effective().0 == AeadBackend::Batched;
        batch
    }

    /// A batched batch whose every pass takes `path`, or `None` if this CPU cannot run it.
    /// For tests and benches.
    pub fn pinned(path: Path) -> Option<Self> {
        path.available().then(|| {
            let mut batch = Batch::default();
            batch.defers = true;
            batch.pinned = Some(path);
            batch
        })
    }

    /// Whether [`super::Sealer::seal_deferred`] and [`super::Opener::open_deferred`] queue
    /// envelopes here; if not, they seal and open each at once.
    pub fn defers(&self) -> bool {
        self.defers
    }

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
        if self.keys.len() == self.keys.capacity() {
            // Grown by hand: `push` would move the entries and free the old block unwiped.
            // Dropping the old vector drops each entry in place, which wipes it.
            let mut grown = Vec::with_capacity((2 * self.keys.capacity()).max(4));
            grown.extend(self.keys.iter().map(|k| KeyEntry {
                id: k.id,
                words: k.words,
            }));
            self.keys = grown;
        }
        // Filled in place, so no copy of the words is left on the stack.
        self.keys.push(KeyEntry { id, words: [0; 8] });
        let last = self.keys.len() - 1;
        for (w, c) in self.keys[last].words.iter_mut().zip(subkey.chunks_exact(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        last
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

    /// The path of this pass: a pinned one, else one by one under the caller's keys for a
    /// batch of at most [`SMALL_BATCH`] whose keys it all holds, else the best vector path.
    fn path(&self, cached: &Cached<'_>) -> Path {
        if let Some(p) = self.pinned {
            return p;
        }
        if self.jobs.len() <= SMALL_BATCH && self.keys.iter().all(|k| cached(k.id).is_some()) {
            Path::Held
        } else if ifma_available() {
            Path::Ifma
        } else if available() {
            Path::Radix26
        } else {
            Path::Scalar
        }
    }

    /// Runs one pass of `seal` or open over `buf` on `path`; marks failures in `failed`.
    fn run(&mut self, buf: &mut [u8], seal: bool, path: Path, cached: &Cached<'_>) {
        match path {
            Path::Held => self.scalar(buf, seal, cached),
            Path::Scalar => self.scalar(buf, seal, &|_| None),
            #[cfg(target_arch = "x86_64")]
            Path::Ifma | Path::Radix26 if available() => {
                // IFMA only where detected, whatever was pinned.
                let ifma = path == Path::Ifma && ifma_available();
                // Safety: AVX-512F is present (checked just above).
                unsafe {
                    if seal {
                        self.seal_avx512(buf, ifma)
                    } else {
                        self.open_avx512(buf, ifma)
                    }
                }
            }
            Path::Ifma | Path::Radix26 => self.scalar(buf, seal, &|_| None),
        }
    }

    fn seal_cached(
        &mut self,
        buf: &mut [u8],
        cached: &Cached<'_>,
    ) -> Result<(), super::EnvelopeError> {
        self.drop_out_of_bounds(buf.len(), true);
        let path = self.path(cached);
        self.run(buf, true, path, cached);
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
        let path = self.path(cached);
        self.run(buf, false, path, cached);
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
        // After a failed open these are the valid tags for the forger's ciphertexts.
        wipe(&mut self.tags);
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
    fn authenticate(&mut self, buf: &[u8], ifma: bool, want: impl Fn(usize) -> bool) {
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
                self.authenticate_group(buf, &group[..n], ifma, &mut keys, &mut tags);
                n = 0;
            }
        }
        if n > 0 {
            self.authenticate_group(buf, &group[..n], ifma, &mut keys, &mut tags);
        }
        keys.zeroize();
        tags.zeroize();
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn authenticate_group(
        &mut self,
        buf: &[u8],
        group: &[usize],
        ifma: bool,
        keys: &mut [[u8; 32]; 8],
        tags: &mut [[u8; TAG_LEN]; 8],
    ) {
        let empty = poly::PolyInput { parts: [&[]; 3] };
        let mut inputs = [empty; 8];
        for (lane, &j) in group.iter().enumerate() {
            keys[lane] = self.poly_keys[j];
            inputs[lane] = self.poly_input(j, buf);
        }
        let (keys, inputs) = (&keys[..group.len()], &inputs[..group.len()]);
        if ifma {
            // Safety: the caller passes `ifma` only once AVX-512 IFMA was detected, and
            // AVX-512F is enabled for this function.
            unsafe { poly::poly1305_x8_ifma(keys, inputs, &mut tags[..]) }
        } else {
            poly::poly1305_x8(keys, inputs, &mut tags[..])
        }
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
    fn seal_avx512(&mut self, buf: &mut [u8], ifma: bool) {
        self.start_pass();
        let skip = std::mem::take(&mut self.failed);
        self.keystream(buf, 0, true, |j| !skip[j]);
        self.write_tails(buf);
        self.authenticate(buf, ifma, |j| !skip[j]);
        for (j, job) in self.jobs.iter().enumerate() {
            if !skip[j] {
                buf[job.tag_at..job.tag_at + TAG_LEN].copy_from_slice(&self.tags[j]);
            }
        }
        self.failed = skip;
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn open_avx512(&mut self, buf: &mut [u8], ifma: bool) {
        self.start_pass();
        let mut failed = std::mem::take(&mut self.failed);
        // Poly1305 keys only: the ciphertext must be authenticated before it is decrypted.
        self.keystream(buf, 0, false, |j| !failed[j]);
        self.write_tails(buf);
        self.authenticate(buf, ifma, |j| !failed[j]);
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

/// Zeroes a pass's Poly1305 keys or tags, one volatile store each. `Vec::zeroize` writes a
/// byte at a time over the whole capacity, which cost 2% of the proxy's CPU at 128 B; the
/// capacity beyond the entries in use was wiped when it was last in use (and `Drop` wipes all
/// of it).
fn wipe<const N: usize>(items: &mut [[u8; N]]) {
    for k in items.iter_mut() {
        // Safety: `k` comes from a live exclusive reference, so it is valid, aligned and not
        // aliased.
        unsafe { std::ptr::write_volatile(k, [0; N]) };
    }
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.poly_keys.zeroize();
        self.tags.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

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
        fn key(&mut self) -> [u8; 32] {
            std::array::from_fn(|_| self.next() as u8)
        }
    }

    /// Every path this CPU runs. With `CIPHERBUS_REQUIRE_ALL_KERNELS` set (CI sets it), a path
    /// the CPU lacks fails the test instead of being skipped.
    fn paths() -> Vec<Path> {
        let require = std::env::var_os("CIPHERBUS_REQUIRE_ALL_KERNELS").is_some();
        Path::ALL
            .into_iter()
            .filter(|p| {
                assert!(
                    p.available() || !require,
                    "{p:?} is not available on this CPU"
                );
                if !p.available() {
                    eprintln!("skipping {p:?}: this CPU cannot run it");
                }
                p.available()
            })
            .collect()
    }

    fn pinned(path: Path) -> Batch {
        Batch::pinned(path).expect("paths() lists only available paths")
    }

    struct Msg {
        key: usize,
        tail: [u8; 8],
        header: Vec<u8>,
        subject: Vec<u8>,
        text: Range<usize>,
        plain: Vec<u8>,
    }

    /// Lengths where a block or a Poly1305 chunk starts or ends, and past the batching limit.
    const EDGES: [usize; 16] = [
        0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1023, 1024, 4095, 4096, 4200,
    ];

    /// A buffer of messages laid out as a session lays them out: each text followed by
    /// room for its tag, with unrelated bytes in between. Texts are up to `max_len` bytes
    /// (edge lengths among them), AADs up to `max_aad`, under `nkeys` subkeys.
    fn messages_with(
        rng: &mut Rng,
        n: usize,
        max_len: usize,
        max_aad: usize,
        nkeys: usize,
    ) -> (Vec<[u8; 32]>, Vec<Msg>, Vec<u8>) {
        let keys: Vec<[u8; 32]> = (0..nkeys).map(|_| rng.key()).collect();
        let mut buf = Vec::new();
        let mut msgs = Vec::new();
        for _ in 0..n {
            let gap = rng.below(20);
            buf.extend(rng.bytes(gap));
            // Mostly one length, as a stream of one publisher's messages, some edges, some
            // anything.
            let len = match rng.below(4) {
                0 => 128.min(max_len),
                1 => EDGES[rng.below(EDGES.len())].min(max_len),
                _ => rng.below(max_len + 1),
            };
            let plain = rng.bytes(len);
            let aad_len = rng.below(max_aad + 1);
            let header_len = rng.below(aad_len + 1);
            let start = buf.len();
            buf.extend_from_slice(&plain);
            buf.extend_from_slice(&[0; TAG_LEN]);
            msgs.push(Msg {
                key: rng.below(keys.len()),
                tail: rng.bytes(8).try_into().expect("8 bytes"),
                header: rng.bytes(header_len),
                subject: rng.bytes(aad_len - header_len),
                text: start..start + len,
                plain,
            });
        }
        (keys, msgs, buf)
    }

    fn messages(rng: &mut Rng, n: usize, max_len: usize) -> (Vec<[u8; 32]>, Vec<Msg>, Vec<u8>) {
        messages_with(rng, n, max_len, 100, 3)
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

    fn aws_key(key: &[u8; 32]) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32 bytes"))
    }

    /// The subkey id of key `i` in these tests.
    fn id_of(i: usize) -> u64 {
        i as u64 + 100
    }

    /// aws-lc keys for `keys`, as a session's sealer or opener holds them.
    fn held(keys: &[[u8; 32]]) -> Vec<LessSafeKey> {
        keys.iter().map(aws_key).collect()
    }

    fn lookup(held: &[LessSafeKey], id: u64) -> Option<&LessSafeKey> {
        held.get(usize::try_from(id).ok()?.checked_sub(100)?)
    }

    fn seal_all(path: Path, keys: &[[u8; 32]], msgs: &[Msg], buf: &mut [u8]) {
        let mut batch = pinned(path);
        for m in msgs {
            batch.push_seal(
                id_of(m.key),
                &keys[m.key],
                m.tail,
                [&m.header, &m.subject],
                m.text.clone(),
                m.text.end,
            );
        }
        assert_eq!(batch.len(), msgs.len());
        let held = held(keys);
        batch
            .seal_cached(buf, &|id| lookup(&held, id))
            .expect("every range fits");
        assert!(batch.is_empty());
    }

    fn check_sealed(keys: &[[u8; 32]], msgs: &[Msg], buf: &[u8], what: &str) {
        for (i, m) in msgs.iter().enumerate() {
            let (ct, tag) = reference(&keys[m.key], m);
            assert_eq!(
                &buf[m.text.clone()],
                &ct[..],
                "{what}: message {i} ciphertext"
            );
            let tag_at = m.text.end;
            assert_eq!(
                &buf[tag_at..tag_at + TAG_LEN],
                &tag,
                "{what}: message {i} tag"
            );
        }
    }

    /// Opens every message of `buf` (sealed) in one batch on `path`, with the messages in
    /// `tampered` changed in one of five ways each; returns the messages refused.
    fn open_all(
        path: Path,
        rng: &mut Rng,
        keys: &[[u8; 32]],
        msgs: &[Msg],
        buf: &mut [u8],
        tampered: &[usize],
    ) -> Vec<usize> {
        let mut batch = pinned(path);
        for (i, m) in msgs.iter().enumerate() {
            let mut tag: [u8; 16] = buf[m.text.end..m.text.end + 16].try_into().expect("tag");
            let mut header = m.header.clone();
            let mut tail = m.tail;
            let mut key = keys[m.key];
            let mut id = id_of(m.key);
            if tampered.contains(&i) {
                match rng.below(5) {
                    0 if !m.text.is_empty() => buf[m.text.start + rng.below(m.text.len())] ^= 0x10,
                    2 if !header.is_empty() => {
                        let at = rng.below(header.len());
                        header[at] ^= 0x80;
                    }
                    3 => tail[rng.below(8)] ^= 0x04,
                    4 => {
                        key[rng.below(32)] ^= 0x40;
                        id = 1_000_000 + i as u64;
                    }
                    _ => tag[rng.below(16)] ^= 0x01,
                }
            }
            batch.push_open(id, &key, tail, [&header, &m.subject], m.text.clone(), tag);
        }
        let held = held(keys);
        let mut refused = Vec::new();
        batch.open_cached(buf, &|id| lookup(&held, id), |i| refused.push(i));
        assert!(batch.is_empty());
        refused
    }

    /// The whole-batch differential test: on every path, batches of 1 to 64 messages of 0 to
    /// 4200 bytes (edge lengths among them), AADs of 0 to 300 bytes, under one to five
    /// subkeys, sealed as RustCrypto seals them and opened back, with one tampered message
    /// refused alone and zeroed. `CIPHERBUS_BATCH_ROUNDS` sets the rounds per path (default
    /// 60); docs/ENVELOPE.md gives the longer run.
    #[test]
    fn every_path_seals_and_opens_whole_batches_as_rustcrypto_does() {
        let rounds: usize = std::env::var("CIPHERBUS_BATCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(60);
        for path in paths() {
            let mut rng = Rng(0x5eed_0016 ^ path as u64);
            for round in 0..rounds {
                let n = 1 + rng.below(64);
                let nkeys = 1 + rng.below(5);
                let (keys, msgs, buf) = messages_with(&mut rng, n, 4200, 300, nkeys);
                let what = format!("{path:?}, round {round}, {n} messages");
                let mut b = buf.clone();
                seal_all(path, &keys, &msgs, &mut b);
                check_sealed(&keys, &msgs, &b, &what);

                let sealed = b.clone();
                assert!(open_all(path, &mut rng, &keys, &msgs, &mut b, &[]).is_empty());
                for m in &msgs {
                    assert_eq!(&b[m.text.clone()], &m.plain[..], "{what}");
                }

                let mut b = sealed;
                let bad = rng.below(n);
                let refused = open_all(path, &mut rng, &keys, &msgs, &mut b, &[bad]);
                assert_eq!(refused, [bad], "{what}");
                for (i, m) in msgs.iter().enumerate() {
                    if i == bad {
                        assert!(b[m.text.clone()].iter().all(|&x| x == 0), "{what}: zeroed");
                    } else {
                        assert_eq!(&b[m.text.clone()], &m.plain[..], "{what}: message {i}");
                    }
                }
            }
        }
    }

    /// Several tampered messages in one batch, in the same Poly1305 group or not: exactly
    /// those are refused and zeroed.
    #[test]
    fn batches_refuse_exactly_the_tampered_messages() {
        for path in paths() {
            let mut rng = Rng(0x5eed_0003);
            for round in 0..30 {
                let n = 1 + rng.below(50);
                let (keys, msgs, buf) = messages(&mut rng, n, 1500);
                let mut b = buf.clone();
                seal_all(path, &keys, &msgs, &mut b);
                let tampered: Vec<usize> = (0..n).filter(|_| rng.below(4) == 0).collect();
                let refused = open_all(path, &mut rng, &keys, &msgs, &mut b, &tampered);
                assert_eq!(refused, tampered, "{path:?}, round {round}");
                for (i, m) in msgs.iter().enumerate() {
                    if tampered.contains(&i) {
                        assert!(b[m.text.clone()].iter().all(|&x| x == 0), "zeroed");
                    } else {
                        assert_eq!(&b[m.text.clone()], &m.plain[..], "message {i} opened");
                    }
                }
            }
        }
    }

    #[test]
    fn every_length_around_the_block_edges_seals_and_opens() {
        for path in paths() {
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
                let what = format!("{path:?}, length {len}");
                seal_all(path, &keys, &msgs, &mut buf);
                check_sealed(&keys, &msgs, &buf, &what);
                let refused = open_all(path, &mut rng, &keys, &msgs, &mut buf, &[]);
                assert!(refused.is_empty(), "{what}");
                assert_eq!(&buf[..len], &msgs[0].plain[..], "{what}");
            }
        }
    }

    /// Without a pin, a batch of at most SMALL_BATCH messages whose keys the caller holds
    /// goes one by one under those keys (a deliberately wrong held key shows which key
    /// sealed); larger ones, or ones with a key not held, take the batch's own copies.
    #[test]
    fn small_batches_use_the_keys_the_caller_holds() {
        let mut rng = Rng(0x5eed_0005);
        for n in 1..=SMALL_BATCH + 1 {
            let (keys, msgs, buf) = messages(&mut rng, n, 600);
            let push = |batch: &mut Batch| {
                for m in &msgs {
                    let (a, t) = ([&m.header[..], &m.subject[..]], m.text.clone());
                    batch.push_seal(id_of(m.key), &keys[m.key], m.tail, a, t, m.text.end);
                }
            };
            let wrong: Vec<[u8; 32]> = keys.iter().map(|k| k.map(|x| x ^ 1)).collect();
            let wrong_held = held(&wrong);
            let mut w = buf.clone();
            let mut batch = Batch::new(AeadBackend::Batched);
            push(&mut batch);
            batch
                .seal_cached(&mut w, &|id| lookup(&wrong_held, id))
                .expect("fits");
            if n <= SMALL_BATCH {
                check_sealed(&wrong, &msgs, &w, "held");
            } else {
                check_sealed(&keys, &msgs, &w, "batched");
            }
            let mut p = buf.clone();
            let mut batch = Batch::new(AeadBackend::Batched);
            push(&mut batch);
            batch.seal_cached(&mut p, &|_| None).expect("fits");
            check_sealed(&keys, &msgs, &p, "not held");
        }
    }

    #[test]
    fn ranges_outside_the_buffer_fail_without_panicking() {
        for path in paths() {
            let mut batch = pinned(path);
            batch.push_seal(1, &[1; 32], [0; 8], [b"h", b""], 10..20, 20);
            let mut small = [0u8; 12];
            assert!(batch.seal(&mut small).is_err(), "{path:?}");
            assert!(batch.is_empty());
            let mut batch = pinned(path);
            batch.push_open(1, &[1; 32], [0; 8], [b"h", b""], 5..50, [0; 16]);
            let mut refused = Vec::new();
            batch.open(&mut small, |i| refused.push(i));
            assert_eq!(refused, [0], "{path:?}");
        }
    }

    #[test]
    fn the_default_backend_queues_nothing() {
        assert!(!Batch::default().defers());
        assert!(!Batch::new(AeadBackend::Audited).defers());
        assert_eq!(
            Batch::new(AeadBackend::Batched).defers(),
            AeadBackend::Batched.effective().0 == AeadBackend::Batched
        );
        assert_eq!(
            AeadBackend::Audited.effective(),
            (AeadBackend::Audited, None)
        );
    }

    /// After a pass on a vector path, every Poly1305 key and every computed tag the batch
    /// held is zero: after a failed open, a computed tag is the valid tag for the forger's
    /// ciphertext.
    #[test]
    fn the_batch_keeps_no_key_material_or_tags_after_a_pass() {
        for path in paths() {
            if matches!(path, Path::Scalar | Path::Held) {
                continue;
            }
            let mut batch = pinned(path);
            let mut buf = vec![0u8; 3 * (64 + TAG_LEN)];
            let push = |batch: &mut Batch, open: bool| {
                for i in 0..3 {
                    let at = i * (64 + TAG_LEN);
                    let (tail, aad) = ([i as u8; 8], [&b"h"[..], &b"s"[..]]);
                    if open {
                        // A forged tag: the one the pass computes is the valid one.
                        batch.push_open(2, &[9; 32], tail, aad, at..at + 64, [0xee; 16]);
                    } else {
                        batch.push_seal(2, &[9; 32], tail, aad, at..at + 64, at + 64);
                    }
                }
            };
            push(&mut batch, false);
            batch.seal(&mut buf).expect("fits");
            assert!(batch.keys.is_empty() && batch.poly_keys.is_empty());
            push(&mut batch, true);
            let mut refused = 0;
            batch.open(&mut buf, |_| refused += 1);
            assert_eq!(refused, 3);
            // Only the slots the passes used: capacity beyond them was never initialised.
            let poly_keys = batch.poly_keys.spare_capacity_mut();
            assert!(poly_keys.len() >= 3);
            for k in poly_keys.iter().take(3) {
                // Safety: these slots held the pass's keys (`resize` initialised them) and
                // `clear` does not de-initialise `[u8; 32]` values; reading them is sound.
                assert_eq!(unsafe { k.assume_init_ref() }, &[0; 32], "{path:?}");
            }
            let tags = batch.tags.spare_capacity_mut();
            assert!(tags.len() >= 3);
            for t in tags.iter().take(3) {
                // Safety: as above, for the tags.
                assert_eq!(unsafe { t.assume_init_ref() }, &[0; 16], "{path:?}");
            }
        }
    }

    /// The allocator of this test binary: it passes everything to the system allocator, and
    /// while a thread watches for a byte pattern, counts the blocks that thread frees or
    /// moves with the pattern still in them.
    struct Watching;

    thread_local! {
        static WATCHED: Cell<Option<[u8; 32]>> = const { Cell::new(None) };
        static FREED_WITH_IT: Cell<usize> = const { Cell::new(0) };
    }

    impl Watching {
        /// # Safety
        /// `ptr` must point to a live block of `size` bytes.
        unsafe fn check(ptr: *mut u8, size: usize) {
            let Some(pattern) = WATCHED.with(Cell::get) else {
                return;
            };
            // Safety: the caller's contract; the block is still allocated here.
            let block = unsafe { std::slice::from_raw_parts(ptr, size) };
            if block.windows(pattern.len()).any(|w| w == pattern) {
                FREED_WITH_IT.with(|n| n.set(n.get() + 1));
            }
        }
    }

    // Safety: every call goes to the system allocator unchanged; `check` only reads a block
    // before it is freed or moved.
    unsafe impl GlobalAlloc for Watching {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // Safety: forwarded as the caller made it.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // Safety: `ptr` is a live block of `layout.size()` bytes until the call below.
            unsafe {
                Self::check(ptr, layout.size());
                System.dealloc(ptr, layout)
            }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // Safety: as for `dealloc`; a move leaves the old block behind.
            unsafe {
                Self::check(ptr, layout.size());
                System.realloc(ptr, layout, new_size)
            }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Watching = Watching;

    /// One pass with `distinct` subkeys on `path` while watching for the first subkey's bytes:
    /// the number of blocks freed or moved with them still in.
    fn blocks_freed_holding_a_subkey(path: Path, distinct: usize) -> usize {
        let keys: Vec<[u8; 32]> = (0..distinct).map(|i| [0xa0 + i as u8; 32]).collect();
        let mut buf = vec![0u8; distinct * (64 + TAG_LEN)];
        FREED_WITH_IT.with(|n| n.set(0));
        WATCHED.with(|w| w.set(Some(keys[0])));
        {
            let mut batch = pinned(path);
            for (i, key) in keys.iter().enumerate() {
                let at = i * (64 + TAG_LEN);
                batch.push_seal(i as u64, key, [0; 8], [b"h", b""], at..at + 64, at + 64);
            }
            batch.seal(&mut buf).expect("fits");
            batch.release();
        }
        WATCHED.with(|w| w.set(None));
        FREED_WITH_IT.with(Cell::get)
    }

    /// A pass with more distinct subkeys than the key vector has room for grows it; the block
    /// it leaves behind, and every other block the pass frees, holds no subkey.
    #[test]
    fn growing_the_key_vector_leaves_no_subkey_in_freed_memory() {
        for path in paths() {
            for distinct in [1, 4, 5, 9, 17] {
                assert_eq!(
                    blocks_freed_holding_a_subkey(path, distinct),
                    0,
                    "{path:?}, {distinct} subkeys"
                );
            }
        }
    }

    /// The watch sees what it is meant to see: a vector grown by `push` leaves its keys behind.
    #[test]
    fn the_watching_allocator_sees_a_key_left_in_a_freed_block() {
        let mut v: Vec<[u8; 32]> = vec![[0x5c; 32]];
        FREED_WITH_IT.with(|n| n.set(0));
        WATCHED.with(|w| w.set(Some([0x5c; 32])));
        v.push([0; 32]);
        WATCHED.with(|w| w.set(None));
        v.zeroize();
        assert_eq!(FREED_WITH_IT.with(Cell::get), 1);
    }
}
