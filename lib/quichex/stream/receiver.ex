defmodule Quichex.Stream.Receiver do
  @moduledoc false
  # The receive side of a stream process: what the connection read ahead
  # waits in `buffer` until the owner takes it, as messages (active modes)
  # or with recv/2 (passive), or until a handler callback ran on it. The end
  # of the stream (FIN or reset) is delivered like data: in order, after
  # everything before it, and only while the stream is active, so an
  # `active: :once` loop re-arms once more to see it.
  #
  # Credit: the connection may read `granted` more bytes for us. As the
  # owner takes data we give it back, a quarter window at a time, so at most
  # about `window` bytes (or what a recv/2 with a larger `length` waits for)
  # sit here: QUIC flow control reaches the peer.

  alias Quichex.Call
  alias Quichex.Stream.{HandlerRunner, Server}

  ## Input from the connection

  def data(state, bin, fin) do
    size = byte_size(bin)

    state = %{
      state
      | buffer: if(size > 0, do: [bin | state.buffer], else: state.buffer),
        buffered: state.buffered + size,
        granted: max(state.granted - size, 0),
        fin: state.fin or fin
    }

    deliver(state)
  end

  def reset(state, code), do: deliver(%{state | reset: code})

  # quiche refused a read (never expected for a readable stream): end the
  # receive side with the reason.
  def failed(state, reason), do: {:cont, close(state, {:error, reason})}

  @doc "Stops receiving: drops what is buffered and answers a waiting reader with `reply`."
  def close(state, reply) do
    state = fail_reader(state, reply)
    %{state | recv_done: true, buffer: [], buffered: 0}
  end

  ## Delivery

  @doc "Hands whatever is due to the handler, the owner (active) or a waiting reader."
  def deliver(%{recv_done: true} = state), do: {:cont, state}
  def deliver(%{handler: handler} = state) when handler != nil, do: HandlerRunner.deliver(state)
  # No owner yet (Quichex.ConnectionHandler): hold everything for the owner.
  def deliver(%{owner: nil} = state), do: {:cont, give_credit(state)}
  def deliver(%{active: false} = state), do: {:cont, state |> serve_reader() |> give_credit()}

  def deliver(%{buffered: n} = state) when n > 0 do
    data = take_all(state)
    Server.notify(state, {:quic_stream, state.conn, self(), data})
    state = count_active(%{state | buffer: [], buffered: 0})
    deliver(state)
  end

  def deliver(%{fin: true} = state) do
    Server.notify(state, {:quic_stream_fin, state.conn, self()})
    {:cont, %{state | recv_done: true}}
  end

  def deliver(%{reset: code} = state) when code != nil do
    Server.notify(state, {:quic_stream_reset, state.conn, self(), code})
    {:cont, %{state | recv_done: true}}
  end

  def deliver(state), do: {:cont, give_credit(state)}

  defp count_active(%{active: :once} = state), do: %{state | active: false}

  defp count_active(%{active: 1} = state) do
    Server.notify(state, {:quic_stream_passive, state.conn, self()})
    %{state | active: false}
  end

  defp count_active(%{active: n} = state) when is_integer(n), do: %{state | active: n - 1}
  defp count_active(state), do: state

  def set_active(state, active), do: deliver(%{state | active: active})

  ## Passive reads

  def recv(state, from, _length, _timeout) when state.handler != nil or state.active != false do
    Server.reply(from, {:error, :active})
    {:cont, state}
  end

  def recv(%{reader: reader} = state, from, _length, _timeout) when reader != nil do
    Server.reply(from, {:error, :busy})
    {:cont, state}
  end

  def recv(state, from, length, timeout) do
    case take(state, length) do
      {reply, state} ->
        Server.reply(from, reply)
        {:cont, give_credit(state)}

      :wait ->
        ref = make_ref()

        timer =
          if timeout != :infinity,
            do: Process.send_after(self(), {:quichex_recv_timeout, ref}, timeout)

        state = %{state | reader: %{from: from, length: length, ref: ref, timer: timer}}
        {:cont, give_credit(state)}
    end
  end

  def reader_timeout(%{reader: %{ref: ref, from: from}} = state, ref) do
    Server.reply(from, {:error, :timeout})
    {:cont, %{state | reader: nil}}
  end

  def reader_timeout(state, _ref), do: {:cont, state}

  defp serve_reader(%{reader: nil} = state), do: state

  defp serve_reader(%{reader: reader} = state) do
    case take(state, reader.length) do
      {reply, state} ->
        Call.cancel_timer(reader.timer)
        Server.reply(reader.from, reply)
        %{state | reader: nil}

      :wait ->
        state
    end
  end

  defp fail_reader(%{reader: nil} = state, _reply), do: state

  defp fail_reader(%{reader: reader} = state, reply) do
    Call.cancel_timer(reader.timer)
    Server.reply(reader.from, reply)
    %{state | reader: nil}
  end

  # `{reply, state}` when a read of `length` bytes (0: whatever there is)
  # can be answered now, else :wait.
  defp take(%{buffered: 0} = state, _length) do
    cond do
      state.recv_done -> {{:error, :closed}, state}
      state.fin -> {{:ok, "", true}, %{state | recv_done: true}}
      state.reset != nil -> {{:error, {:reset, state.reset}}, %{state | recv_done: true}}
      true -> :wait
    end
  end

  defp take(state, length) do
    ended? = state.fin or state.reset != nil

    if length == 0 or length <= state.buffered or ended? do
      all = take_all(state)
      n = if length == 0, do: byte_size(all), else: min(length, byte_size(all))
      <<out::binary-size(n), rest::binary>> = all
      fin? = rest == "" and state.fin
      state = %{state | buffer: if(rest == "", do: [], else: [rest]), buffered: byte_size(rest)}
      state = if fin?, do: %{state | recv_done: true}, else: state
      {{:ok, out, fin?}, state}
    else
      :wait
    end
  end

  defp take_all(%{buffer: [bin]}), do: bin
  defp take_all(%{buffer: buffer}), do: buffer |> Enum.reverse() |> IO.iodata_to_binary()

  ## Credit

  @doc false
  # Gives the connection credit so that buffered + granted reaches the
  # window (or what a waiting reader needs), in steps of a quarter window
  # so credit messages stay rare; at once when a reader waits on nothing.
  def give_credit(%{recv_done: true} = state), do: state

  def give_credit(state) do
    need =
      case state.reader do
        %{length: length} when length > state.window -> length
        _ -> state.window
      end

    deficit = need - state.buffered - state.granted
    starving? = state.granted == 0 and state.reader != nil

    if deficit >= div(state.window, 4) or (starving? and deficit > 0) do
      Server.cast_conn(state, {:credit, state.id, deficit})
      %{state | granted: state.granted + deficit}
    else
      state
    end
  end
end
