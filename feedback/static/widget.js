/* loopchat feedback widget: one <script src="/widget.js" defer></script>, no build step, no CDN.
 *
 * Under each assistant message it adds thumbs up/down, an optional comment and "Suggest a better
 * answer"; for two answers to one prompt it adds the side-by-side choice.
 *
 *   LoopchatWidget.configure({endpoint: "https://chat.example", user: "user-123"});
 *   LoopchatWidget.attach(messageWrapper, "chatcmpl-...");
 *   LoopchatWidget.attachPair(answerA, "chatcmpl-a", answerB, "chatcmpl-b", {onChoose});
 *
 * Declarative use needs no code at all: any element with data-loopchat-completion-id gets the
 * rating controls appended inside it, also when added later; two elements with the same
 * data-loopchat-pair value (and completion ids) get the side-by-side choice. Put the attribute on
 * the message's wrapper, not on the element whose text you replace while streaming.
 *
 * Every piece of user or model text goes into the page through textContent or setAttribute,
 * never innerHTML. Events `loopchat:feedback` and `loopchat:preference` bubble from the controls.
 */
(function () {
  'use strict';

  // Loaded twice (two script tags): keep the first copy, its observer and its state.
  if (window.LoopchatWidget) return;

  const script = document.currentScript;
  const config = {
    // The API lives where the script came from, so a host page on another origin needs no setup.
    endpoint: script && script.src ? new URL(script.src, location.href).origin : location.origin,
    user: null,
    headers: {},
  };
  // The server's limits; checked here too so the user learns before typing a long text in vain.
  const LIMITS = { comment: 2000, correction: 8000 };
  const STORAGE_KEY = 'loopchat-user';
  const SELECTOR = '[data-loopchat-completion-id]';
  const controls = new WeakMap(); // container element -> RatingControls
  const pairs = new WeakMap(); // first answer element -> PairChoice
  let memoryUser = null;
  let uid = 0; // unique element ids for label/aria-controls pairs

  function randomId() {
    // randomUUID exists only in secure contexts; getRandomValues everywhere.
    if (window.crypto && crypto.randomUUID) return 'u-' + crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return 'u-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  /** The end user's key: configured, else a random id kept in localStorage across visits. */
  function userKey() {
    if (config.user) return config.user;
    try {
      let id = localStorage.getItem(STORAGE_KEY);
      if (!id) {
        id = randomId();
        localStorage.setItem(STORAGE_KEY, id);
      }
      return id;
    } catch (_) {
      // Storage blocked (privacy mode, sandboxed frame): one id for the life of the page.
      return memoryUser || (memoryUser = randomId());
    }
  }

  function configure(options) {
    for (const key of ['endpoint', 'user', 'headers']) {
      if (options && options[key] !== undefined) config[key] = options[key];
    }
    config.endpoint = String(config.endpoint || '').replace(/\/+$/, '');
    return Object.assign({}, config, { user: userKey() });
  }

  /** POST JSON; resolves with the JSON body, rejects with the API's own error message. */
  async function post(path, body) {
    let response;
    try {
      response = await fetch(config.endpoint + path, {
        method: 'POST',
        headers: Object.assign({ 'content-type': 'application/json' }, config.headers),
        body: JSON.stringify(body),
      });
    } catch (_) {
      throw new Error('Network error: feedback not saved. Please try again.');
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      // Not JSON (a proxy's error page): the status code is all we can tell.
    }
    if (!response.ok) {
      const error = data && data.error;
      const message = error && typeof error.message === 'string' && error.message;
      throw new Error(message || 'Feedback not saved (HTTP ' + response.status + ').');
    }
    return data;
  }

  /** Builds an element. Text only ever goes in through textContent / append(string). */
  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  // An inline SVG, not an emoji: many systems (and headless browsers) have no emoji font.
  const THUMB_PATH = 'M2 21h4V9H2v12zm20-11c0-1.1-.9-2-2-2h-6.3l.95-4.57.03-.32c0-.41-.17-.79-.44-1.06' +
    'L13.17 1 7.59 6.59C7.22 6.95 7 7.45 7 8v11c0 1.1.9 2 2 2h9c.83 0 1.54-.5 1.84-1.22l3.02-7.05' +
    'c.09-.23.14-.47.14-.73v-2z';

  function thumbIcon(down) {
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('aria-hidden', 'true');
    svg.setAttribute('focusable', 'false');
    svg.setAttribute('class', 'loopchat-icon');
    const path = document.createElementNS(ns, 'path');
    path.setAttribute('d', THUMB_PATH);
    path.setAttribute('fill', 'currentColor');
    if (down) path.setAttribute('transform', 'rotate(180 12 12)');
    svg.append(path);
    return svg;
  }

  function emit(node, name, detail) {
    node.dispatchEvent(new CustomEvent(name, { bubbles: true, detail }));
  }

  // Every rule is under a loopchat- class, so neither the host page nor the widget restyles the other.
  const CSS = `
.loopchat-feedback,.loopchat-pair{display:block;margin:.5em 0 0;font:13px/1.4 system-ui,sans-serif;color:#333;text-align:left}
.loopchat-row{display:flex;flex-wrap:wrap;gap:.4em;align-items:center;margin:0}
.loopchat-btn{font:inherit;margin:0;padding:.25em .7em;border:1px solid #aaa;border-radius:4px;background:#fff;color:#222;cursor:pointer}
.loopchat-btn:hover{background:#f2f2f2}
.loopchat-thumb{display:inline-flex;align-items:center;padding:.25em .5em}
.loopchat-icon{display:block;width:1.2em;height:1.2em}
.loopchat-btn[aria-pressed="true"]{background:#dce8fb;border-color:#1a5fb4;color:#0b3a75}
.loopchat-btn:disabled{opacity:.6;cursor:default}
.loopchat-btn:focus-visible,.loopchat-textarea:focus-visible{outline:3px solid #1a5fb4;outline-offset:2px}
.loopchat-panel{margin:.5em 0 0}
.loopchat-feedback [hidden],.loopchat-pair [hidden]{display:none!important}
.loopchat-label{display:block;margin:0 0 .2em;font-weight:600}
.loopchat-textarea{display:block;box-sizing:border-box;width:100%;margin:0 0 .3em;padding:.3em;font:inherit;border:1px solid #aaa;border-radius:4px;resize:vertical}
.loopchat-status{min-height:1.4em;margin:.3em 0 0;color:#2a6b2a}
.loopchat-status.loopchat-error{color:#b00020}
`;

  function injectStyles() {
    if (document.getElementById('loopchat-widget-style')) return;
    (document.head || document.documentElement).append(el('style', { id: 'loopchat-widget-style', text: CSS }));
  }

  /** Thumbs, comment and correction under one assistant message. */
  class RatingControls {
    constructor(container, completionId, options) {
      this.container = container;
      this.completionId = completionId;
      this.state = { rating: null, comment: '', correction: '' };
      this.queue = Promise.resolve();
      this.pending = 0;
      const what = options.label || 'this answer';

      this.up = this.thumb('up', 'Good answer (thumbs up)');
      this.down = this.thumb('down', 'Bad answer (thumbs down)');
      this.comment = this.panel('comment', 'Your comment (optional)', 'Send comment');
      this.correction = this.panel('correction', 'A better answer', 'Send suggestion');
      this.status = el('p', { class: 'loopchat-status', role: 'status', 'aria-live': 'polite' });
      this.root = el(
        'div',
        { class: 'loopchat-feedback', role: 'group', 'aria-label': 'Feedback on ' + what, 'data-loopchat-for': completionId },
        [
          el('div', { class: 'loopchat-row' }, [
            this.up, this.down, this.comment.toggle, this.correction.toggle,
          ]),
          this.comment.node,
          this.correction.node,
          this.status,
        ],
      );
      container.append(this.root);
    }

    thumb(value, label) {
      const button = el('button', {
        type: 'button', class: 'loopchat-btn loopchat-thumb loopchat-thumb-' + value, 'aria-pressed': 'false',
        'aria-label': label, title: label, onclick: () => this.rate(value),
      });
      button.append(thumbIcon(value === 'down'));
      return button;
    }

    panel(kind, labelText, sendText) {
      const id = 'loopchat-' + kind + '-' + ++uid;
      const textarea = el('textarea', {
        id, class: 'loopchat-textarea loopchat-' + kind, rows: kind === 'comment' ? '2' : '5',
        maxlength: String(LIMITS[kind]),
      });
      const send = el('button', { type: 'button', class: 'loopchat-btn loopchat-send-' + kind, text: sendText });
      const node = el('div', { class: 'loopchat-panel', id: id + '-panel', hidden: '' }, [
        el('label', { class: 'loopchat-label', for: id, text: labelText }),
        textarea,
        el('div', { class: 'loopchat-row' }, [send]),
      ]);
      const toggle = el('button', {
        type: 'button', class: 'loopchat-btn loopchat-toggle-' + kind, 'aria-expanded': 'false',
        'aria-controls': id + '-panel', text: kind === 'comment' ? 'Add a comment' : 'Suggest a better answer',
      });
      const panel = { kind, node, textarea, send, toggle };
      toggle.addEventListener('click', () => (node.hidden ? this.open(panel, true) : this.close(panel)));
      send.addEventListener('click', () => this.submit(panel));
      textarea.addEventListener('keydown', (event) => {
        // Enter types a newline in a comment; Ctrl/Cmd+Enter sends; Escape closes the box.
        if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
          event.preventDefault();
          this.submit(panel);
        } else if (event.key === 'Escape') {
          event.preventDefault();
          this.close(panel);
        }
      });
      return panel;
    }

    open(panel, focus) {
      panel.node.hidden = false;
      panel.toggle.setAttribute('aria-expanded', 'true');
      if (focus) panel.textarea.focus();
    }

    close(panel) {
      panel.node.hidden = true;
      panel.toggle.setAttribute('aria-expanded', 'false');
      panel.toggle.focus(); // focus must not vanish with the box
    }

    rate(value) {
      this.state.rating = value;
      this.up.setAttribute('aria-pressed', String(value === 'up'));
      this.down.setAttribute('aria-pressed', String(value === 'down'));
      // A thumbs down invites a reason: show the comment box, but leave focus where it is.
      if (value === 'down') this.open(this.comment, false);
      this.send();
    }

    submit(panel) {
      const text = panel.textarea.value.trim();
      if (text.length > LIMITS[panel.kind]) {
        this.show('Too long: at most ' + LIMITS[panel.kind] + ' characters.', 'error');
        return;
      }
      this.state[panel.kind] = text;
      this.send();
    }

    /** Posts the full current state: the server keeps one current rating per answer and user. */
    send() {
      const body = { completion_id: this.completionId, user: userKey() };
      if (this.state.rating) body.rating = this.state.rating;
      if (this.state.comment) body.comment = this.state.comment;
      if (this.state.correction) body.correction = this.state.correction;
      if (!body.rating && !body.comment && !body.correction) {
        this.show('Choose thumbs up or down, or write something first.', 'error');
        return this.queue;
      }
      this.pending += 1;
      this.root.setAttribute('aria-busy', 'true');
      this.show('Saving…', 'saving');
      // One post at a time, in click order: each carries the full state, so the last must land last.
      const run = () =>
        post('/v1/feedback', body).then(
          (saved) => {
            if (this.pending === 1) this.show('Thanks — feedback saved', 'saved');
            emit(this.root, 'loopchat:feedback', { request: body, response: saved });
          },
          (error) => this.show(error.message, 'error'),
        );
      this.queue = this.queue.then(run).finally(() => {
        this.pending -= 1;
        if (!this.pending) this.root.removeAttribute('aria-busy');
      });
      return this.queue;
    }

    show(text, state) {
      this.status.textContent = text;
      this.status.classList.toggle('loopchat-error', state === 'error');
      this.root.setAttribute('data-loopchat-state', state);
    }

    destroy() {
      this.root.remove();
      controls.delete(this.container);
    }
  }

  /** "Which answer is better?" for two answers to one prompt; labels never name the model. */
  class PairChoice {
    constructor(elA, idA, elB, idB, options) {
      const labels = options.labels || ['Answer A', 'Answer B'];
      this.onChoose = options.onChoose;
      this.buttons = [
        this.button(labels[0], idA, idB),
        this.button(labels[1], idB, idA),
      ];
      this.status = el('p', { class: 'loopchat-status', role: 'status', 'aria-live': 'polite' });
      this.root = el('div', { class: 'loopchat-pair', role: 'group', 'aria-label': 'Which answer is better?' }, [
        el('div', { class: 'loopchat-row' }, this.buttons),
        this.status,
      ]);
      this.elA = elA;
      (options.container || commonAncestor(elA, elB)).append(this.root);
    }

    button(label, chosen, rejected) {
      const button = el('button', {
        type: 'button', class: 'loopchat-btn loopchat-choose', 'aria-pressed': 'false',
        text: label + ' is better', onclick: () => this.choose(button, chosen, rejected),
      });
      return button;
    }

    async choose(button, chosen, rejected) {
      for (const b of this.buttons) b.setAttribute('aria-pressed', String(b === button));
      const body = { chosen_completion_id: chosen, rejected_completion_id: rejected, user: userKey() };
      this.status.textContent = 'Saving…';
      this.status.classList.remove('loopchat-error');
      this.root.setAttribute('data-loopchat-state', 'saving');
      try {
        const saved = await post('/v1/feedback/preference', body);
        this.status.textContent = 'Thanks — choice saved';
        this.root.setAttribute('data-loopchat-state', 'saved');
        emit(this.root, 'loopchat:preference', { request: body, response: saved });
        if (typeof this.onChoose === 'function') this.onChoose({ chosen, rejected });
      } catch (error) {
        this.status.textContent = error.message;
        this.status.classList.add('loopchat-error');
        this.root.setAttribute('data-loopchat-state', 'error');
      }
    }
  }

  function commonAncestor(a, b) {
    let node = a.parentElement || a;
    while (node.parentElement && !node.contains(b)) node = node.parentElement;
    return node;
  }

  function attach(container, completionId, options) {
    if (!(container instanceof Element)) throw new TypeError('LoopchatWidget.attach: container must be an element');
    if (!completionId) throw new TypeError('LoopchatWidget.attach: completionId is required');
    const id = String(completionId);
    const existing = controls.get(container);
    if (existing) {
      if (existing.completionId === id) return existing; // attach is idempotent
      existing.destroy();
    }
    injectStyles();
    const controller = new RatingControls(container, id, options || {});
    controls.set(container, controller);
    return controller;
  }

  function attachPair(elA, idA, elB, idB, options) {
    if (!(elA instanceof Element) || !(elB instanceof Element)) {
      throw new TypeError('LoopchatWidget.attachPair: answers must be elements');
    }
    if (!idA || !idB) throw new TypeError('LoopchatWidget.attachPair: both completion ids are required');
    if (pairs.has(elA)) return pairs.get(elA);
    injectStyles();
    const pair = new PairChoice(elA, String(idA), elB, String(idB), options || {});
    pairs.set(elA, pair);
    return pair;
  }

  function detach(container) {
    const existing = controls.get(container);
    if (existing) existing.destroy();
  }

  /** Declarative use: controls for every marked element under `root`, pairs by data-loopchat-pair. */
  function scan(root) {
    if (!root || root.nodeType !== 1) return;
    const found = root.matches(SELECTOR) ? [root] : [];
    found.push(...root.querySelectorAll(SELECTOR));
    const pairNames = new Set();
    for (const node of found) {
      const id = node.getAttribute('data-loopchat-completion-id');
      if (!id) continue; // set empty while the answer streams; the id comes later
      attach(node, id);
      if (node.hasAttribute('data-loopchat-pair')) pairNames.add(node.getAttribute('data-loopchat-pair'));
    }
    for (const name of pairNames) {
      // Compared as strings, not through a CSS selector: the value is host data.
      const members = Array.from(document.querySelectorAll('[data-loopchat-pair]')).filter(
        (node) => node.getAttribute('data-loopchat-pair') === name && node.matches(SELECTOR),
      );
      if (members.length === 2) {
        const [a, b] = members;
        attachPair(a, a.getAttribute('data-loopchat-completion-id'), b, b.getAttribute('data-loopchat-completion-id'));
      }
    }
  }

  function start() {
    scan(document.body);
    new MutationObserver((records) => {
      for (const record of records) {
        if (record.type === 'attributes') scan(record.target);
        else for (const node of record.addedNodes) scan(node);
      }
    }).observe(document.documentElement, {
      childList: true, subtree: true, attributes: true, attributeFilter: ['data-loopchat-completion-id'],
    });
  }

  window.LoopchatWidget = Object.freeze({
    version: '1',
    configure,
    user: userKey,
    attach,
    attachPair,
    detach,
    scan,
  });

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start, { once: true });
  else start();
})();
