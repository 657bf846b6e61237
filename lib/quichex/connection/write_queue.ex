defmodule Quichex.Connection.WriteQueue do
  @moduledoc false
  # Stream writes quiche has not taken yet, first in first out per stream.
  # A write is answered (`:ok`) only once quiche took every byte, and its
  # FIN; until then it waits here for flow or congestion control, bounded by
  # its caller's timeout.
  #
  # Writes are retried when something can have unblocked them: packets
  # arrived (ACKs and flow-control credit come only that way) or new writes
  # were queued. A flush that moved nothing marks the queue blocked, so a
  # thousand waiting streams cost nothing on unrelated events.

  defmodule Write do
    @moduledoc false
    @enforce_keys [:ref, :from, :data, :fin]
    defstruct [:ref, :from, :data, :fin, deadline: :infinity, timer: nil]

    @type t :: %__MODULE__{
            ref: reference(),
            from: GenServer.from(),
            data: binary(),
            fin: boolean(),
            deadline: integer() | :infinity,
            timer: reference() | nil
          }
  end

  defstruct by_id: %{}, blocked: false

  @type t :: %__MODULE__{by_id: %{non_neg_integer() => [Write.t()]}, blocked: boolean()}

  def new, do: %__MODULE__{}

  def empty?(%__MODULE__{by_id: by_id}), do: map_size(by_id) == 0

  def pending?(q, id), do: Map.has_key?(q.by_id, id)

  def push(q, id, %Write{} = write) do
    %{q | by_id: Map.update(q.by_id, id, [write], &(&1 ++ [write])), blocked: false}
  end

  def unblock(q), do: %{q | blocked: false}

  @doc """
  The writes to hand the NIF now: `[{id, data, fin}]`, with the
  `[{id, ref}]` that identifies each. Nothing while blocked. Streams come in
  the order `rank` (a function of the stream id) gives: quiche can only
  prioritize data it has taken, and under flow control the first stream
  written takes the credit.
  """
  def batch(%__MODULE__{blocked: true}, _rank), do: {[], []}

  def batch(q, rank) do
    q.by_id
    |> Enum.sort_by(fn {id, _} -> rank.(id) end)
    |> Enum.flat_map(fn {id, writes} ->
      for w <- writes, do: {{id, w.data, w.fin}, {id, w.ref}}
    end)
    |> Enum.unzip()
  end

  @doc """
  Applies the NIF's results to the writes `keys` named. Returns the queue
  and the writes that ended, `[{id, write, :ok | {:error, reason}}]`, in
  order per stream. A write that failed takes every later write of its
  stream with it.
  """
  def apply_results(q, keys, results) do
    by_ref = Map.new(Enum.zip(keys, results), fn {{_id, ref}, result} -> {ref, result} end)

    {by_id, ended, progress?} =
      Enum.reduce(q.by_id, {%{}, [], false}, fn {id, writes}, {by_id, ended, progress?} ->
        {kept, ended, progress?} = walk(id, writes, by_ref, nil, [], ended, progress?)
        by_id = if kept == [], do: by_id, else: Map.put(by_id, id, kept)
        {by_id, ended, progress?}
      end)

    {%{q | by_id: by_id, blocked: keys != [] and not progress?}, Enum.reverse(ended)}
  end

  defp walk(_id, [], _by_ref, _failed, kept, ended, progress?),
    do: {Enum.reverse(kept), ended, progress?}

  defp walk(id, [write | rest], by_ref, {:error, _} = failed, kept, ended, progress?),
    do: walk(id, rest, by_ref, failed, kept, [{id, write, failed} | ended], progress?)

  defp walk(id, [write | rest], by_ref, nil, kept, ended, progress?) do
    size = byte_size(write.data)

    case Map.fetch(by_ref, write.ref) do
      {:ok, {:error, _} = failed} ->
        walk(id, rest, by_ref, failed, kept, [{id, write, failed} | ended], true)

      {:ok, ^size} ->
        walk(id, rest, by_ref, nil, kept, [{id, write, :ok} | ended], true)

      {:ok, n} when is_integer(n) and n > 0 and n < size ->
        left = %{write | data: binary_part(write.data, n, size - n)}
        walk(id, rest, by_ref, nil, [left | kept], ended, true)

      # Nothing taken, or not part of this flush.
      _ ->
        walk(id, rest, by_ref, nil, [write | kept], ended, progress?)
    end
  end

  defp drop(q, id), do: %{q | by_id: Map.delete(q.by_id, id)}

  @doc "Removes every write of stream `id`; returns them."
  def remove(q, id) do
    {Map.get(q.by_id, id, []), drop(q, id)}
  end

  @doc "Removes the write `ref` of stream `id` (its deadline passed); returns it or nil."
  def expire(q, id, ref) do
    case q.by_id do
      %{^id => writes} ->
        case Enum.split_with(writes, &(&1.ref == ref)) do
          {[write], []} -> {write, drop(q, id)}
          {[write], rest} -> {write, %{q | by_id: Map.put(q.by_id, id, rest)}}
          _ -> {nil, q}
        end

      _ ->
        {nil, q}
    end
  end

  @doc "Every queued write; the queue empties."
  def drain(q), do: {for({id, ws} <- q.by_id, w <- ws, do: {id, w}), new()}

  @doc "Writes still waiting with a deadline and no timer: `[{id, write}]`."
  def untimed(q) do
    for {id, ws} <- q.by_id, w <- ws, w.timer == nil, w.deadline != :infinity, do: {id, w}
  end

  @doc "Records the timer of write `ref`."
  def put_timer(q, id, ref, timer) do
    case q.by_id do
      %{^id => writes} ->
        writes = Enum.map(writes, fn w -> if w.ref == ref, do: %{w | timer: timer}, else: w end)
        %{q | by_id: Map.put(q.by_id, id, writes)}

      _ ->
        q
    end
  end
end
