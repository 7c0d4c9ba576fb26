//! The global allocator of Tally's binaries (and of the benchmark's ceiling, so that both sides of
//! a comparison allocate alike): mimalloc, asked for a plain block whenever the layout allows.
//!
//! The `mimalloc` crate passes every request to `mi_malloc_aligned`, whose fast path only takes
//! blocks of at most 1 KiB; anything larger (a request's Kafka payload, hyper's buffers) went
//! through mimalloc's generic aligned path, 5 of the ingest's ~13 allocations per 1-event request
//! at ~300 instructions each. `mi_malloc` returns blocks aligned to 16 bytes (`MI_MAX_ALIGN_SIZE`,
//! and to the block size below that), so any layout with an alignment of at most 16 and no larger
//! than its size is served by the plain functions, as the standard library's `System` does with
//! `malloc`; larger alignments still go to the aligned ones.
#![allow(unsafe_code)] // a global allocator is an unsafe trait; each call below is mimalloc's own

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc, mi_zalloc_aligned,
};

/// The alignment every `mi_malloc` block of at least this size has.
const PLAIN_ALIGN: usize = 16;

fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

pub struct Allocator;

// SAFETY: every block comes from mimalloc with at least the layout's size and alignment (the plain
// functions only where their guaranteed alignment covers it) and goes back to `mi_free`, which
// frees blocks of both kinds.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi_malloc(layout.size()).cast()
        } else {
            mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi_zalloc(layout.size()).cast()
        } else {
            mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _: Layout) {
        mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size from 1 byte to 64 KiB (a step that grows with it) at every alignment up to 4 KiB
    /// is aligned as asked, zeroed when asked, and keeps its bytes when grown and shrunk.
    #[test]
    fn blocks_have_the_layouts_alignment_and_keep_their_bytes() {
        let mut size = 1usize;
        while size <= 64 << 10 {
            for align in [1usize, 2, 4, 8, 16, 32, 64, 4096] {
                let Ok(layout) = Layout::from_size_align(size, align) else { continue };
                unsafe {
                    let block = Allocator.alloc(layout);
                    assert!(!block.is_null());
                    assert_eq!(block as usize % align, 0, "size {size} align {align}");
                    std::ptr::write_bytes(block, 0xa5, size);
                    let grown = Allocator.realloc(block, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "grown: size {size} align {align}");
                    assert!(std::slice::from_raw_parts(grown, size).iter().all(|b| *b == 0xa5));
                    let grown_layout = Layout::from_size_align(size * 3, align).unwrap();
                    let shrunk = Allocator.realloc(grown, grown_layout, size.div_ceil(2));
                    assert_eq!(shrunk as usize % align, 0, "shrunk: size {size} align {align}");
                    assert!(std::slice::from_raw_parts(shrunk, size.div_ceil(2)).iter().all(|b| *b == 0xa5));
                    Allocator.dealloc(shrunk, Layout::from_size_align(size.div_ceil(2), align).unwrap());
                    let zeroed = Allocator.alloc_zeroed(layout);
                    assert_eq!(zeroed as usize % align, 0);
                    assert!(std::slice::from_raw_parts(zeroed, size).iter().all(|b| *b == 0));
                    Allocator.dealloc(zeroed, layout);
                }
            }
            size += 1 + size / 8;
        }
    }
}
