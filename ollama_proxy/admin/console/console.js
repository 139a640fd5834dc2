// The ollama-proxy web console: vanilla JS, no build step, nothing fetched from
// elsewhere. Every text that comes from the API goes into the page as a text node
// (textContent / append of strings), never as markup.
'use strict';

const KEY_STORE = 'ollama-proxy-key';
const SVG_NS = 'http://www.w3.org/2000/svg';
const LIMITS = ['requests_per_minute', 'requests_per_day', 'tokens_per_minute', 'tokens_per_day',
  'token_quota', 'quota_period', 'max_concurrent', 'max_tokens_per_request', 'allowed_models',
  'expires_at', 'weight'];
const COUNTED = new Set(['requests_per_minute', 'requests_per_day', 'tokens_per_minute',
  'tokens_per_day', 'token_quota', 'max_concurrent', 'max_tokens_per_request']);
const METRICS = {
  requests: { label: 'Requests', of: (r) => r.requests || 0 },
  tokens: { label: 'Tokens', of: (r) => (r.prompt_tokens || 0) + (r.completion_tokens || 0) },
  gpu: { label: 'GPU seconds', of: (r) => r.gpu_seconds || 0 },
};

const state = { key: sessionStorage.getItem(KEY_STORE), me: null, view: null, timer: null };

// ---------------------------------------------------------------- DOM helpers

// An element: props set attributes (class, data-*, ...), on* listeners, text the text;
// children are elements or strings (which become text nodes).
function el(tag, props, ...kids) {
  const node = document.createElement(tag);
  setProps(node, props);
  for (const kid of kids.flat()) {
    if (kid !== null && kid !== undefined && kid !== false) node.append(kid instanceof Node ? kid : String(kid));
  }
  return node;
}

function setProps(node, props) {
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (name === 'text') node.textContent = String(value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
}

function svg(tag, props, ...kids) {
  const node = document.createElementNS(SVG_NS, tag);
  setProps(node, props);
  for (const kid of kids) node.append(kid instanceof Node ? kid : String(kid));
  return node;
}

function table(headers, rows, numeric) {
  const num = new Set(numeric || []);
  return el('div', { class: 'scroll' }, el('table', {},
    el('thead', {}, el('tr', {}, headers.map((h, i) => el('th', { class: num.has(i) ? 'num' : null }, h)))),
    el('tbody', {}, rows.map((row) => el('tr', {},
      row.map((cell, i) => el('td', { class: num.has(i) ? 'num' : null }, cell)))))));
}

function fmt(n, digits) {
  if (n === null || n === undefined) return '—';
  if (typeof n !== 'number') return String(n);
  return n.toLocaleString('en-US', { maximumFractionDigits: digits === undefined ? 1 : digits });
}

function isoDay(date) { return date.toISOString().slice(0, 10); }
function isoSecond(date) { return date.toISOString().slice(0, 19) + 'Z'; }

function message(err) { return err && err.message ? err.message : String(err); }

function errorLine(id) { return el('p', { class: 'error', id, role: 'alert' }); }

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: 'Bearer ' + state.key } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 204) return null;
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new ApiError(response.status, errorText(response, data));
  return data;
}

function errorText(response, data) {
  const error = data && data.error;
  if (error && typeof error === 'object' && error.message) return String(error.message);
  if (typeof error === 'string') return error;
  return response.status + ' ' + response.statusText;
}

// ---------------------------------------------------------------- charts

// A bar chart of points [{label, value}]: each bar carries data-label and data-value.
// Its texts sit outside the SVG, which stretches to the width it is given.
function barChart(points, title, id) {
  const width = 600, height = 150, top = 6;
  const max = Math.max(0, ...points.map((p) => p.value));
  const step = width / Math.max(1, points.length);
  const chart = svg('svg', { class: 'chart', id, viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: 'none', role: 'img', 'aria-label': title });
  points.forEach((p, i) => {
    const h = max > 0 ? (height - top) * p.value / max : 0;
    chart.append(svg('rect', { class: 'bar', x: i * step + step * 0.1, width: Math.max(1, step * 0.8),
      y: height - h, height: h, 'data-label': p.label, 'data-value': p.value },
    svg('title', {}, `${p.label}: ${fmt(p.value, 3)}`)));
  });
  const ends = points.length ? [points[0].label, points[points.length - 1].label] : [];
  return el('figure', { class: 'figure' }, el('figcaption', {}, `${title} (max ${fmt(max, 2)})`), chart,
    el('div', { class: 'axis' }, ends.map((label) => el('span', {}, label))));
}

// The keys of consecutive days (or hours) from `since`, so that a chart has a bar for
// every period, zero where nothing happened.
function periods(kind, count, now) {
  const keys = [];
  for (let i = count - 1; i >= 0; i--) {
    if (kind === 'day') {
      keys.push(isoDay(new Date(now.getTime() - i * 86400000)));
    } else {
      const d = new Date(now.getTime() - i * 3600000);
      keys.push(d.toISOString().slice(0, 13) + ':00Z');
    }
  }
  return keys;
}

function series(rows, keys, metric) {
  const by = new Map(rows.map((r) => [r.key, r]));
  return keys.map((k) => ({ label: k, value: by.has(k) ? METRICS[metric].of(by.get(k)) : 0 }));
}

function metricPicker(current, onChange, id) {
  const select = el('select', { id, 'aria-label': 'Metric', onchange: () => onChange(select.value) },
    Object.entries(METRICS).map(([k, m]) => el('option', { value: k, selected: k === current }, m.label)));
  return select;
}

// ---------------------------------------------------------------- login and navigation

async function login(key) {
  state.key = key;
  const me = await api('GET', '/v1/me');
  sessionStorage.setItem(KEY_STORE, key);
  state.me = me;
  document.getElementById('login').hidden = true;
  document.getElementById('nav').hidden = false;
  document.getElementById('logout').hidden = false;
  document.getElementById('who').textContent = `${me.name} (${me.role})`;
  for (const button of document.querySelectorAll('#nav button')) {
    button.hidden = button.hasAttribute('data-admin') && me.role !== 'admin';
  }
  show(me.role === 'admin' ? 'overview' : 'me');
}

function logout() {
  sessionStorage.removeItem(KEY_STORE);
  state.key = null;
  state.me = null;
  stopTimer();
  if (state.abort) state.abort.abort();
  for (const view of document.querySelectorAll('.view')) { view.hidden = true; view.replaceChildren(); }
  document.getElementById('nav').hidden = true;
  document.getElementById('logout').hidden = true;
  document.getElementById('who').textContent = '';
  document.getElementById('login').hidden = false;
  document.getElementById('login-key').value = '';
}

function stopTimer() {
  if (state.timer !== null) { clearInterval(state.timer); state.timer = null; }
}

const VIEWS = {};

function show(name) {
  stopTimer();
  if (state.abort) state.abort.abort();
  state.view = name;
  for (const button of document.querySelectorAll('#nav button')) {
    button.classList.toggle('active', button.dataset.view === name);
  }
  for (const view of document.querySelectorAll('.view')) {
    view.hidden = view.id !== 'view-' + name;
    if (view.hidden) view.replaceChildren();
  }
  // A fresh box per showing: a view still loading from an earlier showing writes into its
  // own box, detached by now, and starts no timer (every).
  const box = document.createElement('div');
  document.getElementById('view-' + name).replaceChildren(box);
  VIEWS[name](box).catch((err) => box.append(el('p', { class: 'error', role: 'alert' }, message(err))));
}

function every(box, refresh) {
  if (!box.isConnected) return;
  stopTimer();
  state.timer = setInterval(() => refresh().catch(() => {}), 2000);
}

// ---------------------------------------------------------------- any user: own usage

VIEWS.me = async (section) => {
  const me = await api('GET', '/v1/me');
  state.me = me;
  const since = isoDay(new Date(Date.now() - 29 * 86400000));
  const usage = await api('GET', `/v1/usage?group_by=day&since=${since}`);
  const keys = periods('day', 30, new Date());
  const holder = el('div', { id: 'me-chart' });
  const draw = (metric) => holder.replaceChildren(barChart(series(usage.rows, keys, metric),
    `${METRICS[metric].label} per day, last 30 days`, 'me-usage-chart'));
  draw('tokens');
  const limitRows = LIMITS.map((name) => [name, limitText(me.limits[name]),
    COUNTED.has(name) && name in me.remaining ? fmt(me.remaining[name], 0) : '']);
  section.append(
    el('h2', {}, 'My usage'),
    el('p', {}, 'User ', el('b', { id: 'me-name' }, me.name), ', role ', me.role, ', key ',
      el('code', { id: 'me-key' }, me.key)),
    el('div', { class: 'row' }, metricPicker('tokens', draw, 'me-metric')), holder,
    el('div', { id: 'me-usage-table' }, table(['Day', 'Requests', 'Prompt tokens', 'Completion tokens', 'GPU s'],
      usage.rows.slice().reverse().map((r) => [r.key, fmt(r.requests, 0), fmt(r.prompt_tokens, 0),
        fmt(r.completion_tokens, 0), fmt(r.gpu_seconds, 2)]), [1, 2, 3, 4])),
    el('h3', {}, 'Limits and what remains'),
    el('div', { id: 'me-limits' }, table(['Limit', 'Value', 'Remaining'], limitRows, [2])),
    el('h3', {}, 'My keys'),
    el('div', { id: 'me-keys' }, table(['Prefix', 'Created', 'Last used', 'Expires', 'State'],
      (me.keys || []).map((k) => [el('code', {}, k.prefix), k.created_at, k.last_used_at || 'never',
        k.expires_at || 'never', k.revoked ? 'revoked' : (k.prefix === me.key ? 'active (this one)' : 'active')]))));
};

function limitText(value) {
  if (value === null || value === undefined) return 'unlimited';
  if (Array.isArray(value)) return value.length ? value.join(', ') : 'none';
  return typeof value === 'number' ? fmt(value, 3) : String(value);
}

// ---------------------------------------------------------------- any user: playground

VIEWS.playground = async (section) => {
  const models = await api('GET', '/v1/models');
  const select = el('select', { id: 'pg-model', 'aria-label': 'Model' },
    (models.data || []).map((m) => el('option', { value: m.id }, m.id)));
  const prompt = el('textarea', { id: 'pg-prompt', placeholder: 'Say something…', 'aria-label': 'Prompt' });
  const send = el('button', { type: 'submit', class: 'primary', id: 'pg-send' }, 'Send');
  const stop = el('button', { type: 'button', id: 'pg-stop', disabled: true }, 'Stop');
  const clear = el('button', { type: 'button', id: 'pg-clear' }, 'Clear');
  const chat = el('div', { class: 'chat', id: 'pg-chat' });
  const stats = el('p', { class: 'hint', id: 'pg-stats' });
  const error = errorLine('pg-error');
  const history = [];
  const form = el('form', { id: 'pg-form' }, el('div', { class: 'row' }, el('label', {}, 'Model', select)),
    prompt, el('div', { class: 'row' }, send, stop, clear));
  clear.addEventListener('click', () => { history.length = 0; chat.replaceChildren(); stats.textContent = ''; });
  stop.addEventListener('click', () => { if (state.abort) state.abort.abort(); });
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const text = prompt.value;
    if (!text.trim() || !select.value) return;
    history.push({ role: 'user', content: text });
    chat.append(el('div', { class: 'msg user' }, text));
    const answer = el('div', { class: 'msg assistant' });
    chat.append(answer);
    prompt.value = '';
    error.textContent = '';
    stats.textContent = 'waiting…';
    send.disabled = true; stop.disabled = false;
    try {
      const reply = await streamChat(select.value, history, answer, stats);
      history.push({ role: 'assistant', content: reply });
    } catch (err) {
      if (err.name === 'AbortError') {
        stats.textContent = 'stopped';
        answer.classList.add('stopped');
      } else {
        error.textContent = message(err);
        stats.textContent = '';
      }
      history.pop();
    } finally {
      state.abort = null;
      send.disabled = false; stop.disabled = true;
    }
  });
  section.append(el('h2', {}, 'Playground'), form, error, chat, stats);
};

// One streamed chat completion into `answer`; resolves to the whole reply.
async function streamChat(model, messages, answer, stats) {
  const abort = new AbortController();
  state.abort = abort;
  const started = performance.now();
  const response = await fetch('/v1/chat/completions', {
    method: 'POST', signal: abort.signal,
    headers: { Authorization: 'Bearer ' + state.key, 'Content-Type': 'application/json' },
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    throw new ApiError(response.status, errorText(response, data));
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '', reply = '', first = null, pieces = 0, usage = null;
  const rate = () => {
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    const tokens = usage ? usage.completion_tokens : pieces;
    return seconds > 0 ? tokens / seconds : 0;
  };
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split('\n');
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith('data:')) continue;
      const data = line.slice(5).trim();
      if (data === '[DONE]') continue;
      const frame = JSON.parse(data);
      if (frame.error) throw new ApiError(500, errorText(response, frame));
      const delta = frame.choices && frame.choices[0] && frame.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        pieces += 1;
        reply += delta.content;
        answer.textContent = reply;
        stats.textContent = `${fmt(rate(), 1)} tokens/s`;
      }
      if (frame.usage) usage = frame.usage;
    }
  }
  const total = (performance.now() - started) / 1000;
  stats.textContent = usage
    ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens, ` +
      `${fmt(rate(), 1)} tokens/s, ${fmt(total, 2)} s`
    : `${fmt(rate(), 1)} tokens/s, ${fmt(total, 2)} s`;
  stats.dataset.usage = usage ? JSON.stringify(usage) : '';
  return reply;
}

// ---------------------------------------------------------------- admin: overview

VIEWS.overview = async (section) => {
  const now = new Date();
  const day = await api('GET', `/admin/api/usage?group_by=hour&since=${isoSecond(new Date(now - 23 * 3600000)).slice(0, 13)}:00:00Z`);
  const since7 = isoDay(new Date(now - 6 * 86400000));
  const week = await api('GET', `/admin/api/usage?group_by=day&since=${since7}`);
  const users = await api('GET', `/admin/api/usage?group_by=user&since=${since7}`);
  const models = await api('GET', `/admin/api/usage?group_by=model&since=${since7}`);
  const live = el('div', { class: 'cards', id: 'ov-live' });
  const charts = el('div', { class: 'charts', id: 'ov-charts' });
  const hours = periods('hour', 24, now), days = periods('day', 7, now);
  const draw = (metric) => charts.replaceChildren(
    barChart(series(day.rows, hours, metric), `${METRICS[metric].label} per hour, 24 h`, 'ov-24h'),
    barChart(series(week.rows, days, metric), `${METRICS[metric].label} per day, 7 d`, 'ov-7d'));
  draw('requests');
  const top = (rows) => rows.slice().sort((a, b) => METRICS.tokens.of(b) - METRICS.tokens.of(a)).slice(0, 5)
    .map((r) => [r.key === null ? '(none)' : r.key, fmt(r.requests, 0), fmt(METRICS.tokens.of(r), 0), fmt(r.gpu_seconds, 2)]);
  section.append(el('h2', {}, 'Overview'), live,
    el('div', { class: 'row' }, metricPicker('requests', draw, 'ov-metric')), charts,
    el('div', { class: 'charts' },
      el('div', {}, el('h3', {}, 'Top users, 7 d'), table(['User', 'Requests', 'Tokens', 'GPU s'], top(users.rows), [1, 2, 3])),
      el('div', {}, el('h3', {}, 'Top models, 7 d'), table(['Model', 'Requests', 'Tokens', 'GPU s'], top(models.rows), [1, 2, 3]))));
  const refresh = async () => {
    const b = await api('GET', '/admin/api/backends');
    const inFlight = b.backends.reduce((sum, x) => sum + x.in_flight, 0);
    const up = b.backends.filter((x) => x.up).length;
    live.replaceChildren(
      el('div', { class: 'card' }, el('b', { id: 'ov-in-flight' }, inFlight), el('span', {}, 'in flight')),
      el('div', { class: 'card' }, el('b', { id: 'ov-queued' }, b.queued), el('span', {}, 'queued')),
      el('div', { class: 'card' }, el('b', {}, `${up}/${b.backends.length}`), el('span', {}, 'backends up')));
  };
  await refresh();
  every(section, refresh);
};

// ---------------------------------------------------------------- admin: users

VIEWS.users = async (section) => {
  const list = await api('GET', '/admin/api/users');
  const error = errorLine('users-error');
  const detail = el('div', { id: 'user-detail' });
  const name = el('input', { id: 'new-user-name', placeholder: 'name', required: true, 'aria-label': 'Name' });
  const role = el('select', { id: 'new-user-role', 'aria-label': 'Role' },
    el('option', { value: 'user' }, 'user'), el('option', { value: 'admin' }, 'admin'));
  const created = el('div', { id: 'new-user-key' });
  const form = el('form', { class: 'row', id: 'new-user-form' }, el('label', {}, 'New user', name),
    el('label', {}, 'Role', role), el('button', { type: 'submit', class: 'primary' }, 'Create'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    try {
      const user = await api('POST', '/admin/api/users', { name: name.value, role: role.value });
      await VIEWS.users(fresh(section));
      document.getElementById('new-user-key').replaceChildren(secretBox(`Key of ${user.name}`, user.key));
    } catch (err) { error.textContent = message(err); }
  });
  const act = (fn) => async () => {
    error.textContent = '';
    try { await fn(); } catch (err) { error.textContent = message(err); }
  };
  const rows = list.users.map((u) => [
    el('span', { class: 'user-name' }, u.name), u.role,
    el('span', { class: 'user-status' }, u.suspended ? 'suspended' : 'active'),
    fmt(u.usage.requests, 0), fmt(u.usage.prompt_tokens + u.usage.completion_tokens, 0),
    el('span', { class: 'user-limits' }, overridesText(u.limits)),
    el('div', { class: 'row' },
      el('button', { type: 'button', 'data-action': 'limits', onclick: act(() => editLimits(detail, u, section)) }, 'Limits'),
      el('button', { type: 'button', 'data-action': 'keys', onclick: act(() => showKeys(detail, u.name)) }, 'Keys'),
      el('button', { type: 'button', 'data-action': u.suspended ? 'resume' : 'suspend',
        onclick: act(async () => {
          await api('PATCH', `/admin/api/users/${encodeURIComponent(u.name)}`, { suspended: !u.suspended });
          await VIEWS.users(fresh(section));
        }) }, u.suspended ? 'Resume' : 'Suspend'),
      el('button', { type: 'button', class: 'danger', 'data-action': 'delete',
        onclick: act(async () => {
          if (!window.confirm(`Delete user ${u.name} and all its keys?`)) return;
          await api('DELETE', `/admin/api/users/${encodeURIComponent(u.name)}`);
          await VIEWS.users(fresh(section));
        }) }, 'Delete')),
  ]);
  const usersTable = table(['Name', 'Role', 'Status', 'Requests', 'Tokens', 'Own limits', ''], rows, [3, 4]);
  usersTable.id = 'users-table';
  list.users.forEach((u, i) => usersTable.querySelectorAll('tbody tr')[i].setAttribute('data-user', u.name));
  section.append(el('h2', {}, 'Users'), form, created, error, usersTable, detail);
};

function fresh(section) { section.replaceChildren(); return section; }

function overridesText(limits) {
  const parts = Object.entries(limits || {}).filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(',') : v}`);
  return parts.length ? parts.join('; ') : 'defaults';
}

function secretBox(title, secret) {
  const note = el('span', { class: 'ok' });
  const copy = el('button', { type: 'button', id: 'copy-key', onclick: async () => {
    try { await navigator.clipboard.writeText(secret); note.textContent = ' copied'; } catch (err) {
      const range = document.createRange(); range.selectNodeContents(code);
      const sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
      note.textContent = ' selected: press Ctrl+C';
    }
  } }, 'Copy');
  const code = el('div', { class: 'secret', id: 'secret-key' }, secret);
  return el('div', { class: 'panel' }, el('b', {}, title),
    el('p', { class: 'hint' }, 'Shown this once: copy it now.'), code, el('div', { class: 'row' }, copy, note));
}

async function editLimits(detail, user, section) {
  const own = user.limits || {};
  const inputs = {};
  const error = errorLine('limits-error');
  const fields = LIMITS.map((name) => {
    let input;
    if (name === 'quota_period') {
      input = el('select', { name }, ['', 'total', 'month'].map((v) =>
        el('option', { value: v, selected: (own[name] || '') === v }, v || '(default)')));
    } else {
      const value = own[name];
      input = el('input', { name, placeholder: 'default',
        value: value === null || value === undefined ? '' : Array.isArray(value) ? value.join(', ') : value });
    }
    inputs[name] = input;
    return el('label', {}, name, input);
  });
  const form = el('form', { id: 'limits-form' }, el('div', { class: 'limits-form' }, fields),
    el('div', { class: 'row' }, el('button', { type: 'submit', class: 'primary' }, 'Save limits'),
      el('button', { type: 'button', onclick: () => detail.replaceChildren() }, 'Cancel')));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const limits = {};
    for (const [name, input] of Object.entries(inputs)) {
      const text = input.value.trim();
      if (text === '') limits[name] = null;
      else if (name === 'allowed_models') limits[name] = text.split(',').map((s) => s.trim()).filter(Boolean);
      else if (name === 'quota_period' || name === 'expires_at') limits[name] = text;
      else limits[name] = /^-?[0-9.]+$/.test(text) ? Number(text) : text; // the API says what is wrong
    }
    try {
      await api('PATCH', `/admin/api/users/${encodeURIComponent(user.name)}`, { limits });
      await VIEWS.users(fresh(section));
    } catch (err) { error.textContent = message(err); }
  });
  detail.replaceChildren(el('div', { class: 'panel' }, el('h3', {}, 'Limits of ', user.name),
    el('p', { class: 'hint' }, 'Empty: the [limits] default.'), form, error));
}

async function showKeys(detail, name) {
  const user = await api('GET', `/admin/api/users/${encodeURIComponent(name)}`);
  const error = errorLine('keys-error');
  const fresh = el('div');
  const rows = user.keys.map((k) => [el('code', {}, k.prefix), k.created_at, k.last_used_at || 'never',
    k.expires_at || 'never', k.revoked ? 'revoked' : el('button', { type: 'button', class: 'danger',
      onclick: async () => {
        try { await api('DELETE', `/admin/api/keys/${encodeURIComponent(k.prefix)}`); await showKeys(detail, name); } catch (err) { error.textContent = message(err); }
      } }, 'Revoke')]);
  const add = el('button', { type: 'button', id: 'new-key', onclick: async () => {
    try {
      const key = await api('POST', `/admin/api/users/${encodeURIComponent(name)}/keys`, {});
      await showKeys(detail, name);
      detail.querySelector('.key-slot').replaceChildren(secretBox(`New key of ${name}`, key.key));
    } catch (err) { error.textContent = message(err); }
  } }, 'New key');
  detail.replaceChildren(el('div', { class: 'panel' }, el('h3', {}, 'Keys of ', user.name),
    table(['Prefix', 'Created', 'Last used', 'Expires', ''], rows), el('div', { class: 'row' }, add),
    el('div', { class: 'key-slot' }, fresh), error));
}

// ---------------------------------------------------------------- admin: usage

VIEWS.usage = async (section) => {
  const group = el('select', { id: 'usage-group', 'aria-label': 'Group by' },
    ['user', 'model', 'day', 'hour'].map((g) => el('option', { value: g }, g)));
  const since = el('input', { id: 'usage-since', value: isoDay(new Date(Date.now() - 29 * 86400000)), 'aria-label': 'Since' });
  const until = el('input', { id: 'usage-until', placeholder: 'now', 'aria-label': 'Until' });
  const user = el('input', { id: 'usage-user', placeholder: 'any', 'aria-label': 'User' });
  const model = el('input', { id: 'usage-model', placeholder: 'any', 'aria-label': 'Model' });
  const out = el('div', { id: 'usage-out' });
  const error = errorLine('usage-error');
  let rows = [];
  const columns = ['key', 'requests', 'prompt_tokens', 'completion_tokens', 'errors', 'gpu_seconds', 'load_seconds'];
  const load = async () => {
    error.textContent = '';
    const q = new URLSearchParams({ group_by: group.value });
    for (const [name, input] of [['since', since], ['until', until], ['user', user], ['model', model]]) {
      if (input.value.trim()) q.set(name, input.value.trim());
    }
    try {
      rows = (await api('GET', `/admin/api/usage?${q}`)).rows;
    } catch (err) { error.textContent = message(err); return; }
    const chart = (group.value === 'day' || group.value === 'hour')
      ? barChart(rows.map((r) => ({ label: r.key, value: METRICS.tokens.of(r) })), 'Tokens', 'usage-chart') : null;
    out.replaceChildren(...[chart, table(columns, rows.map((r) => columns.map((c) =>
      c === 'key' ? (r.key === null ? '(none)' : r.key) : fmt(r[c], c.endsWith('seconds') ? 3 : 0))), [1, 2, 3, 4, 5, 6])].filter(Boolean));
  };
  const csv = () => {
    const cell = (v) => {
      let s = v === null || v === undefined ? '' : String(v);
      if (typeof v === 'string' && /^[=+\-@\t\r]/.test(s)) s = "'" + s;  // never a spreadsheet formula
      return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
    };
    const text = [columns.join(','), ...rows.map((r) => columns.map((c) => cell(r[c])).join(','))].join('\r\n') + '\r\n';
    const url = URL.createObjectURL(new Blob([text], { type: 'text/csv' }));
    const link = el('a', { href: url, download: `usage-by-${group.value}.csv` });
    document.body.append(link); link.click(); link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  };
  const form = el('form', { class: 'row', id: 'usage-form' }, el('label', {}, 'Group by', group),
    el('label', {}, 'Since', since), el('label', {}, 'Until', until), el('label', {}, 'User', user),
    el('label', {}, 'Model', model), el('button', { type: 'submit', class: 'primary' }, 'Show'),
    el('button', { type: 'button', id: 'usage-csv', onclick: csv }, 'Download CSV'));
  form.addEventListener('submit', (event) => { event.preventDefault(); load(); });
  section.append(el('h2', {}, 'Usage'), form, error, out);
  await load();
};

// ---------------------------------------------------------------- admin: backends, audit

VIEWS.backends = async (section) => {
  const out = el('div', { id: 'backends-out' });
  const refresh = async () => {
    const b = await api('GET', '/admin/api/backends');
    out.replaceChildren(el('p', {}, 'Queued now: ', el('b', { id: 'backends-queued' }, b.queued)),
      table(['Name', 'URL', 'Kind', 'State', 'In flight', 'Slots', 'Queued', 'Models', 'Loaded', 'Last error'],
        b.backends.map((x) => [x.name, x.url, x.kind,
          el('span', { class: x.up ? 'ok' : 'error' }, x.up ? 'up' : (x.ejected ? 'ejected' : 'down')),
          fmt(x.in_flight, 0), x.slots ? fmt(x.slots, 0) : '∞', fmt(x.queued, 0), x.models.join(', '),
          x.loaded.join(', '), x.error || '']), [4, 5, 6]));
  };
  section.append(el('h2', {}, 'Backends'), out);
  await refresh();
  every(section, refresh);
};

VIEWS.audit = async (section) => {
  const log = await api('GET', '/admin/api/audit?limit=200');
  section.append(el('h2', {}, 'Audit log'), table(['Time', 'Actor', 'Action', 'Target', 'Detail'],
    log.entries.map((e) => [e.time, e.actor, e.action, e.target, el('code', {}, JSON.stringify(e.detail))])));
};

// ---------------------------------------------------------------- start

document.addEventListener('DOMContentLoaded', () => {
  const form = document.getElementById('login-form');
  const error = document.getElementById('login-error');
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    try { await login(document.getElementById('login-key').value.trim()); } catch (err) {
      state.key = null;
      error.textContent = message(err);
    }
  });
  document.getElementById('logout').addEventListener('click', logout);
  // The API description needs an admin's key, which a plain link does not send.
  document.getElementById('openapi').addEventListener('click', async (event) => {
    if (!state.key) return;
    event.preventDefault();
    try {
      const doc = await api('GET', '/admin/api/openapi.json');
      const url = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 2)], { type: 'application/json' }));
      window.open(url, '_blank', 'noopener');
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (err) { window.alert(message(err)); }
  });
  for (const button of document.querySelectorAll('#nav button')) {
    button.addEventListener('click', () => show(button.dataset.view));
  }
  if (state.key) login(state.key).catch(() => logout());
});
