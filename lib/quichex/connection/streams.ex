defmodule Quichex.Connection.Streams do
  @moduledoc false
  # The connection's stream table: the process serving each stream id, the
  # state of each stream's sending side as far as the API is concerned, the
  # next ids of our own streams, the peer's stream credit, and the
  # open_stream/3 calls waiting for that credit.
  #
  # Which streams quiche still holds, and how much each may read ahead, is
  # kept by the NIF (native/quichex_nif/src/stream.rs).

  import Bitwise

  defmodule Entry do
    @moduledoc false
    # `send`: :open, or why the sending side is closed: :fin (our FIN was
    # accepted), {:stopped, code} (the peer's STOP_SENDING), :reset (we
    # reset it) or :none (a stream we can only receive on). `urgency`: its
    # RFC 9218 urgency, which also orders our writes into quiche.
    defstruct [:pid, send: :open, urgency: 3]

    @type t :: %__MODULE__{
            pid: pid(),
            send: :open | :fin | :reset | :none | {:stopped, non_neg_integer()},
            urgency: 0..7
          }
  end

  defmodule Waiter do
    @moduledoc false
    # An open_stream/3 call waiting for the peer's stream credit.
    @enforce_keys [:from, :request]
    defstruct [:from, :request]

    @type t :: %__MODULE__{from: :gen_statem.from(), request: map()}
  end

  defstruct role: :client,
            by_id: %{},
            by_pid: %{},
            next: %{bidi: 0, uni: 2},
            credit: %{bidi: 0, uni: 0},
            waiters: []

  @type kind :: :bidi | :uni
  @type t :: %__MODULE__{
          role: :client | :server,
          by_id: %{non_neg_integer() => Entry.t()},
          by_pid: %{pid() => non_neg_integer()},
          next: %{kind() => non_neg_integer()},
          credit: %{kind() => non_neg_integer()},
          waiters: [Waiter.t()]
        }

  def new(:client), do: %__MODULE__{role: :client, next: %{bidi: 0, uni: 2}}
  def new(:server), do: %__MODULE__{role: :server, next: %{bidi: 1, uni: 3}}

  ## Stream ids (RFC 9000 section 2.1)

  def bidi?(id), do: (id &&& 2) == 0
  def kind(id), do: if(bidi?(id), do: :bidi, else: :uni)
  def direction(id), do: if(bidi?(id), do: :bidirectional, else: :unidirectional)
  def local?(%__MODULE__{role: role}, id), do: (id &&& 1) == if(role == :client, do: 0, else: 1)

  @doc "Whether we can send on `id`: bidirectional, or our own unidirectional stream."
  def can_send?(t, id), do: bidi?(id) or local?(t, id)

  @doc "Whether we can receive on `id`: bidirectional, or the peer's unidirectional stream."
  def can_recv?(t, id), do: bidi?(id) or not local?(t, id)

  ## Table

  def put(t, id, pid, urgency \\ 3) do
    entry = %Entry{pid: pid, send: if(can_send?(t, id), do: :open, else: :none), urgency: urgency}
    %{t | by_id: Map.put(t.by_id, id, entry), by_pid: Map.put(t.by_pid, pid, id)}
  end

  def fetch(t, id), do: Map.fetch(t.by_id, id)

  def pid(t, id) do
    case t.by_id do
      %{^id => %Entry{pid: pid}} -> pid
      _ -> nil
    end
  end

  def id_of(t, pid), do: Map.fetch(t.by_pid, pid)

  def delete(t, id) do
    case Map.pop(t.by_id, id) do
      {nil, _} -> {nil, t}
      {entry, by_id} -> {entry, %{t | by_id: by_id, by_pid: Map.delete(t.by_pid, entry.pid)}}
    end
  end

  def set_send(t, id, send) do
    case t.by_id do
      %{^id => entry} -> %{t | by_id: Map.put(t.by_id, id, %{entry | send: send})}
      _ -> t
    end
  end

  def set_urgency(t, id, urgency) do
    case t.by_id do
      %{^id => entry} -> %{t | by_id: Map.put(t.by_id, id, %{entry | urgency: urgency})}
      _ -> t
    end
  end

  @doc "The urgency of stream `id` (the default for one we do not know)."
  def urgency(t, id) do
    case t.by_id do
      %{^id => %Entry{urgency: urgency}} -> urgency
      _ -> 3
    end
  end

  def count(t), do: map_size(t.by_id)

  def pids(t), do: Map.keys(t.by_pid)

  ## Our own ids and the peer's credit

  def next_id(t, kind), do: t.next[kind]

  def advance(t, kind), do: %{t | next: Map.update!(t.next, kind, &(&1 + 4))}

  def put_credit(t, bidi, uni), do: %{t | credit: %{bidi: bidi, uni: uni}}

  def credit?(t, kind), do: t.credit[kind] > 0

  ## Waiters

  def add_waiter(t, from, request),
    do: %{t | waiters: t.waiters ++ [%Waiter{from: from, request: request}]}

  def take_waiters(t), do: {t.waiters, %{t | waiters: []}}

  @doc "Splits off the waiters whose deadline passed at `now`."
  def expire_waiters(t, now) do
    {expired, waiting} =
      Enum.split_with(t.waiters, fn %Waiter{request: r} ->
        r.deadline != :infinity and r.deadline <= now
      end)

    {expired, %{t | waiters: waiting}}
  end

  @doc "The earliest waiter deadline, or nil."
  def next_deadline(t) do
    t.waiters
    |> Enum.map(& &1.request.deadline)
    |> Enum.reject(&(&1 == :infinity))
    |> Enum.min(fn -> nil end)
  end
end
