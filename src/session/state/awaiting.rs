//! The tracker's queue of messages awaiting a ReadyForQuery ([`Awaiting`]).

use std::collections::VecDeque;

/// A first-in first-out queue whose front entry lives inline.
///
/// Most sessions wait for one answer at a time, and then the queue never
/// allocates. A pipeline's later entries go to a `VecDeque` behind the
/// front, given back once drained. Why it matters: the tracker lives as
/// long as its session, and a queue grown during a relay run would be a
/// small allocation placed among the run's buffers, left there when they
/// are freed at the next idle point, holding the heap apart (about a
/// kilobyte per idle session on glibc).
#[derive(Debug)]
pub(super) struct Awaiting<T> {
    /// The oldest entry; `None` only when the queue is empty.
    front: Option<T>,
    rest: VecDeque<T>,
}

impl<T> Default for Awaiting<T> {
    fn default() -> Self {
        Awaiting {
            front: None,
            rest: VecDeque::new(),
        }
    }
}

impl<T> Awaiting<T> {
    pub fn push_back(&mut self, entry: T) {
        if self.front.is_none() {
            self.front = Some(entry);
        } else {
            self.rest.push_back(entry);
        }
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let oldest = self.front.take();
        self.front = self.rest.pop_front();
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            self.rest = VecDeque::new();
        }
        oldest
    }

    pub fn front_mut(&mut self) -> Option<&mut T> {
        self.front.as_mut()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.front.iter().chain(self.rest.iter())
    }

    pub fn clear(&mut self) {
        self.front = None;
        self.rest = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_is_a_fifo_queue_like_vecdeque() {
        let mut queue = Awaiting::default();
        let mut oracle = VecDeque::new();
        // Pushes and pops in a pattern that empties the queue now and then.
        for (i, op) in [2, 1, 3, 0, 1, 1, 4, 2, 0, 0, 5, 6, 1].iter().enumerate() {
            for k in 0..*op {
                queue.push_back(i * 10 + k);
                oracle.push_back(i * 10 + k);
            }
            assert_eq!(queue.pop_front(), oracle.pop_front());
            assert_eq!(queue.front_mut().copied(), oracle.front().copied());
            assert!(queue.iter().eq(oracle.iter()));
        }
        queue.clear();
        assert_eq!(queue.pop_front(), None);
        assert_eq!(queue.iter().count(), 0);
    }

    #[test]
    fn one_entry_at_a_time_allocates_nothing() {
        let mut queue = Awaiting::default();
        for i in 0..100 {
            queue.push_back(i);
            assert_eq!(queue.pop_front(), Some(i));
        }
        assert_eq!(queue.rest.capacity(), 0);
        queue.push_back(1);
        queue.push_back(2);
        assert!(queue.rest.capacity() > 0);
        queue.pop_front();
        queue.pop_front();
        assert_eq!(queue.rest.capacity(), 0, "given back once drained");
    }
}
